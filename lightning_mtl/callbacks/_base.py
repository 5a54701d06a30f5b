"""What every public callback shares: it refuses to be used as a class.

``Trainer(callbacks=[ExponentiatedStepSize])`` (the class, not an instance) is accepted by Lightning's ``Trainer``,
which touches a callback there only through class attributes that any tool may read (``state_key``,
``state_dict``). Its first call into a callback is the ``setup`` hook, at the start of ``fit``, ``validate``,
``test`` and ``predict``; on a class it gets the plain function, called with the Trainer in the place of ``self``,
which failed with a missing argument, and then Lightning's ``on_exception`` hook failed the same way on top of it
("on_exception() missing 1 required positional argument"). So every subclass of :class:`InstanceCallback` gets a
``setup`` of its own that checks ``self`` (one ``isinstance`` per ``setup``, once per run) and raises a
``TypeError`` naming the class and an instance to pass, and an ``on_exception`` that stays out of the way when
called on the class, so that this ``TypeError`` is what the user sees. The wrappers keep the hooks' signatures
(``functools.wraps``), so Sphinx and ``inspect.signature`` show the real ones.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, ClassVar

from lightning.pytorch.callbacks import Callback

__all__ = ["InstanceCallback"]


def _class_error(cls: type) -> TypeError:
    name = cls.__name__
    return TypeError(
        f"{name} was passed as a class (as in Trainer(callbacks=[{name}])); pass an instance, e.g. "
        f"`{name}({cls._example_args})`."
    )


def _checked_setup(cls: type, setup: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(setup)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, Callback):  # the class itself in the callbacks: Lightning passed the Trainer as self
            for attr in ("log", "log_dict"):  # what Lightning attached to the class before this first hook
                if isinstance(cls.__dict__.get(attr), types.MethodType):
                    delattr(cls, attr)
            raise _class_error(cls)
        return setup(self, *args, **kwargs)

    return checked


def _quiet_on_exception(on_exception: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(on_exception)
    def quiet(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, Callback):  # the class itself: let the TypeError of setup be the error
            return None
        return on_exception(self, *args, **kwargs)

    return quiet


class InstanceCallback(Callback):
    """A Lightning ``Callback`` that, given to a ``Trainer`` as a class instead of an instance, fails at the first
    hook with ``TypeError: X was passed as a class ...; pass an instance, e.g. `X(...)```.

    Subclasses name the arguments of the example with a class keyword: ``class X(InstanceCallback,
    example_args="gamma=1e-3")``; a subclass without one inherits its parent's.
    """

    _example_args: ClassVar[str] = ""

    def __init_subclass__(cls, example_args: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if example_args is not None:
            cls._example_args = example_args
        cls.setup = _checked_setup(cls, cls.setup)  # type: ignore[method-assign]
        if "on_exception" in cls.__dict__:
            cls.on_exception = _quiet_on_exception(cls.on_exception)  # type: ignore[method-assign]

    @_quiet_on_exception
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Nothing (Lightning's hook), and nothing either when called on the class (see the module docstring)."""
