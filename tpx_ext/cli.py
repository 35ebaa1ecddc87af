"""What the command-line tools share: a user's mistake is one line and exit status 2.

    python -m tpx_ext.train: error: horizon must be >= 1, got 0

as argparse reports a bad option (without its usage block). Tracebacks stay for bugs: only
`UsageError`, and the ValueErrors of the config and estimator checks a command routes here,
become that line.
"""

import argparse
import contextlib
import sys
from typing import Iterator, Tuple, Type


class UsageError(Exception):
    """A bad option, task or run directory of a command, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

    @contextlib.contextmanager
    def reporting(self, *types: Type[BaseException]) -> Iterator[None]:
        """Inside the block, UsageError (and the given types) end the command as one line."""
        catch: Tuple[Type[BaseException], ...] = (UsageError, *types)
        try:
            yield
        except catch as exc:
            self.error(" ".join(str(exc).split()) or type(exc).__name__)
