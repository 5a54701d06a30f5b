"""A missing optional package names the extra that installs it (issue 27: after the README's main install,
``SpanExtractor()`` failed with "No module named 'transformers'" without naming the ``nlp`` extra). The missing package
is simulated with ``sys.modules[name] = None``, which makes ``import name`` raise ``ModuleNotFoundError``."""

from __future__ import annotations

import re
import sys

import pytest

from lightning_mtl._imports import EXTRAS, needs_extra


def install_hint(extra: str) -> str:
    return re.escape(f'pip install "lightning-mtl[{extra}]"')


def hide(monkeypatch: pytest.MonkeyPatch, package: str, *modules: str) -> None:
    """Make ``package`` unimportable, and drop ``modules`` (which import it at their top) so that they import anew."""
    monkeypatch.setitem(sys.modules, package, None)
    for name in modules:
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize("name", ["SpanExtractor", "RelationExtractor", "EventExtractor"])
def test_span_models_name_the_nlp_extra(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import lightning_gen.span as span

    cls = getattr(span, name)
    hide(monkeypatch, "transformers")
    with pytest.raises(ModuleNotFoundError, match=rf"^{name} needs the optional package 'transformers'.*") as info:
        cls()
    assert re.search(install_hint("nlp"), str(info.value)) and info.value.name == "transformers"


def test_span_data_module_tokenizer_path_names_the_nlp_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from lightning_gen.span import SpanDataModule

    path = tmp_path / "train.txt"
    path.write_text("EU NNP B-NP B-ORG\n")
    hide(monkeypatch, "transformers")
    with pytest.raises(
        ModuleNotFoundError, match=r"^SpanDataModule\(tokenizer='bert-base-cased'\) needs .*" + install_hint("nlp")
    ):
        SpanDataModule(train=str(path), tokenizer="bert-base-cased").setup("fit")


def test_cosent_names_the_nlp_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_gen.cosent import CoSENTEncoder
    from lightning_gen.cosent.data import read_hf_pairs

    hide(monkeypatch, "transformers")
    with pytest.raises(
        ModuleNotFoundError, match=r"^CoSENTEncoder needs the optional package 'transformers'.*" + install_hint("nlp")
    ):
        CoSENTEncoder()
    hide(monkeypatch, "datasets")
    with pytest.raises(
        ModuleNotFoundError,
        match=r"^reading the Hugging Face dataset 'hf:x/y:train' needs .*'datasets'.*" + install_hint("nlp"),
    ):
        read_hf_pairs("hf:x/y:train")


def test_lazy_exports_name_the_gen_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_gen
    import lightning_gen.ddpm as ddpm

    hide(monkeypatch, "diffusers", "lightning_gen.ddpm.model", "lightning_gen.ddpm.schedule")
    for get in (lambda: ddpm.DDPM, lambda: lightning_gen.DDPM):  # the second goes through the first
        with pytest.raises(
            ModuleNotFoundError,
            match=r"^lightning_gen\.ddpm\.DDPM needs the optional package 'diffusers'.*" + install_hint("gen"),
        ):
            get()


def test_other_missing_modules_pass_unchanged() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"^No module named 'surely_not_installed_xyz'$"):
        with needs_extra("this"):
            import surely_not_installed_xyz  # noqa: F401
    assert set(EXTRAS.values()) <= {"nlp", "gen", "bench"}
