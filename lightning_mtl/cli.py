"""The ``lightning-mtl`` command: ``demo`` (the main job) and LightningCLI's ``fit/validate/test/predict``.

Examples::

    lightning-mtl demo                                  # multi-task demo on scikit-learn's digits
    lightning-mtl fit --config configs/demo.yaml        # any LightningModule/DataModule given by class path
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "demo":
        from lightning_mtl.demo import main as demo_main

        demo_main(args[1:])
        return
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "lightning-mtl: `lightning-mtl demo` runs the main job; fit/validate/test/"
            "predict take a LightningCLI config (see configs/)."
        },
    )


if __name__ == "__main__":
    main()
