"""Every public callback given to the Trainer as a class, not an instance, fails at the first hook with a TypeError
that names it and shows an instance to pass (issue 27; it failed inside Lightning with "on_exception() missing 1
required positional argument")."""

from __future__ import annotations

import inspect
import re

import lightning as L
import pytest

import lightning_mtl.callbacks as mtl_callbacks
from lightning_gen.ddpm import SampleGrid
from lightning_gen.span import SavePretrained, SpanPredictionWriter
from lightning_mtl.callbacks import ExponentiatedStepSize, MultiTaskGradient
from lightning_mtl.callbacks._base import InstanceCallback
from tests._mtl_models import TwoHeads, loader, make_data

EXAMPLES = {
    "ExponentiatedStepSize": "ExponentiatedStepSize(gamma=0.1, clamp=(0.1, 10.0))",
    "GradientMagnitudeProbe": "GradientMagnitudeProbe(every_n_steps=50)",
    "MultiTaskGradient": "MultiTaskGradient(mtl.MGDA())",
    "ProjectedWeightDecay": "ProjectedWeightDecay()",
    "ResidualProbe": "ResidualProbe(every_n_steps=10)",
    "SampleGrid": "SampleGrid(every_n_epochs=5, steps=50)",
    "SavePretrained": 'SavePretrained(dirpath="out/ner")',
    "SpanPredictionWriter": 'SpanPredictionWriter(output="predictions.jsonl")',
}
CLASSES = [getattr(mtl_callbacks, name) for name in mtl_callbacks.__all__] + [
    SampleGrid,
    SavePretrained,
    SpanPredictionWriter,
]


def trainer(callbacks: list) -> L.Trainer:
    return L.Trainer(
        callbacks=callbacks,
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_every_public_callback_is_covered() -> None:
    assert sorted(c.__name__ for c in CLASSES) == sorted(EXAMPLES)
    assert all(issubclass(c, InstanceCallback) for c in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_class_in_the_callbacks_fails_at_fit_with_an_example(cls: type) -> None:
    message = (
        f"{cls.__name__} was passed as a class (as in Trainer(callbacks=[{cls.__name__}])); pass an instance, e.g. "
        f"`{EXAMPLES[cls.__name__]}`."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$") as info:
        trainer([cls]).fit(TwoHeads(), loader(make_data()))
    assert info.value.__context__ is None  # no second error from on_exception on top of it
    assert "log" not in cls.__dict__ and "log_dict" not in cls.__dict__  # Lightning's attachments removed


def test_validate_too_and_a_subclass_names_itself() -> None:
    class Mine(ExponentiatedStepSize):
        pass

    class Validated(TwoHeads):
        def validation_step(self, batch, batch_idx):
            return sum(self.task_dict(batch)[0].values())

    with pytest.raises(TypeError, match=r"^Mine was passed as a class .* e\.g\. `Mine\(gamma=0\.1, clamp="):
        trainer([Mine]).validate(Validated(), loader(make_data()), verbose=False)


def test_instances_still_train_and_hooks_keep_their_signatures() -> None:
    import lightning_mtl as mtl

    model = TwoHeads()
    trainer([MultiTaskGradient(mtl.MGDA()), ExponentiatedStepSize(gamma=0.1)]).fit(model, loader(make_data()))
    assert model.global_step == 1
    for cls in CLASSES:
        assert list(inspect.signature(cls.setup).parameters) == ["self", "trainer", "pl_module", "stage"]
        assert list(inspect.signature(cls.on_exception).parameters) == ["self", "trainer", "pl_module", "exception"]
