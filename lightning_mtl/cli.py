"""The ``lightning-mtl`` command: ``demo`` (the main job), ``configs`` (the configs that ship with the package) and
LightningCLI's ``fit/validate/test/predict``.

Examples::

    lightning-mtl demo                          # multi-task demo on scikit-learn's digits
    lightning-mtl configs                       # names and paths of the packaged configs
    lightning-mtl fit --config demo             # a packaged config by name (demo, cosent_sts, ddpm_mnist, ...)
    lightning-mtl fit --config my.yaml          # or any LightningCLI config file
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

__all__ = ["find_config", "main", "packaged_configs"]

#: packages whose ``configs/`` folder ships LightningCLI configs: the library's own, then the models'
_CONFIG_PACKAGES = ("lightning_mtl", "lightning_gen")
#: modules imported before parsing so that ``fit --help`` lists their classes among the known subclasses (the
#: library's are cheap and always imported; the models' only for help: they need their extras, and a config names
#: them by full class path, which jsonargparse imports itself)
_LIBRARY_MODULES = ("lightning_mtl.callbacks", "lightning_mtl.demo")
_MODEL_MODULES = (
    "lightning_gen.cosent.model",
    "lightning_gen.cosent.data",
    "lightning_gen.ddpm.model",
    "lightning_gen.ddpm.sampling",
    "lightning_gen.ddpm.data",
    "lightning_gen.gau.lm",
    "lightning_gen.gau.data",
    "lightning_gen.span.model",
    "lightning_gen.span.relations",
    "lightning_gen.span.event_model",
    "lightning_gen.span.datamodules",
)
_TRAINER_COMMANDS = {
    "fit": "train a model (LightningCLI)",
    "validate": "validate a model (LightningCLI)",
    "test": "test a model (LightningCLI)",
    "predict": "predict with a model (LightningCLI)",
}
_OWN_COMMANDS = {
    "demo": "the main job: multi-task weightings on scikit-learn's digits, a table and a plot",
    "configs": "list the LightningCLI configs that ship with the package",
}


def packaged_configs() -> dict[str, Path]:
    """Name -> path of every config shipped in the installed packages (``lightning_mtl/configs``,
    ``lightning_gen/configs``), found through :mod:`importlib.resources`, so it works without a clone."""
    found: dict[str, Path] = {}
    for package in _CONFIG_PACKAGES:
        with contextlib.suppress(ModuleNotFoundError):
            folder = resources.files(package) / "configs"
            if folder.is_dir():
                for entry in sorted(folder.iterdir(), key=lambda e: e.name):
                    if entry.name.endswith(".yaml"):
                        found.setdefault(entry.name.removesuffix(".yaml"), Path(str(entry)))
    return found


def find_config(spec: str) -> str:
    """``spec`` itself if it is an existing file, else the packaged config of that name (with or without
    ``.yaml``, or an old ``configs/<name>.yaml`` path of a clone); otherwise ``spec`` unchanged, for LightningCLI
    to report."""
    if Path(spec).is_file():
        return spec
    name = Path(spec).name.removesuffix(".yaml")
    packaged = packaged_configs()
    return str(packaged[name]) if name in packaged else spec


def _resolve_configs(args: list[str]) -> list[str]:
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("--config", "-c"):
            out += [arg, find_config(next(it, ""))]
        elif arg.startswith("--config="):
            out.append("--config=" + find_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def _help() -> str:
    lines = [
        "usage: lightning-mtl {demo,configs,fit,validate,test,predict} ...",
        "",
        "lightning-mtl: multi-task gradient callbacks, probes and models for PyTorch Lightning.",
        "",
        "subcommands:",
    ]
    lines += [f"  {name:<10} {text}" for name, text in {**_OWN_COMMANDS, **_TRAINER_COMMANDS}.items()]
    lines += [
        "",
        "`lightning-mtl demo --help` and `lightning-mtl fit --help` list their options; `--config` takes a file or",
        "the name of a packaged config (`lightning-mtl configs`).",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _argv(args: list[str]) -> Iterator[None]:
    """Run LightningCLI on ``args`` as if they were the command line (it warns when given ``args=`` while
    ``sys.argv`` holds other arguments)."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lightning-mtl", *args]
    try:
        yield
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-mtl`` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        return
    if args[0] == "demo":
        from lightning_mtl.demo import main as demo_main

        demo_main(args[1:])
        return
    if args[0] == "configs":
        for name, path in packaged_configs().items():
            print(f"{name:<20} {path}")
        return
    from lightning.pytorch.cli import LightningCLI

    wants_help = any(a in ("-h", "--help") or a.startswith("--print_config") for a in args)
    for module in _LIBRARY_MODULES + (_MODEL_MODULES if wants_help else ()):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    with _argv(_resolve_configs(args)):
        LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": _help().split("\n", 2)[2]},
        )


if __name__ == "__main__":
    main()
