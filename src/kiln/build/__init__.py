"""The builder (kiln.build.builder) and what it uses: config, memory planning.

`kiln.build(model, config)` is the public entry point. Because this package is also named `build`, importing
any of its modules makes `kiln.build` refer to the package, not to a function; so the package itself is made
callable and forwards to `kiln.build.builder.build`. Both `kiln.build(...)` and `kiln.build.builder` work.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from kiln.build.builder import build

        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
