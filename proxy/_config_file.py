"""Reading the routing file from disk: the one place skyroute opens it.

``routing.parse_config`` reads no files and no environment; ``load_config`` reads at
most ``MAX_CONFIG_BYTES`` (a bigger file is refused before it is parsed) and passes
the bytes and ``os.environ`` in. The CLI's ``run``, ``validate`` and ``demo`` and live
reload all load through here. It blocks: live reload calls it in a worker thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path

from skyroute.routing import MAX_CONFIG_BYTES, Config, ConfigError, ConfigProblem, parse_config

#: What to do about the usual reasons a routing file cannot be opened.
_WHAT_TO_DO = {errno.ENOENT: "check the path",
               errno.EACCES: "make it readable by the user skyroute runs as",
               errno.EISDIR: "name the routing YAML file itself"}


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the routing file at ``path``.

    Args:
        env: where ``${VAR}`` expands from; ``os.environ`` if not given.

    Raises:
        ConfigError: the file cannot be read, is too big, or has problems (all listed).
    """
    source = str(path)
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        todo = _WHAT_TO_DO.get(exc.errno or 0, "check the path and the file")
        raise ConfigError(source, [ConfigProblem(
            "(file)", None, f"cannot read routing file {source}: "
                            f"{(exc.strerror or str(exc)).lower()}; {todo}")]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, [ConfigProblem(
            "(file)", None, f"the file is larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB; "
                            "a routing file is a few KiB (is this the right file?)")])
    return parse_config(raw, env=os.environ if env is None else env, source=source)
