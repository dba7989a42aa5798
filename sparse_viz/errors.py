"""The one exception type for bad user input, and the one warning type for settings that run
but cannot show what they seem to.

Command-line entry points catch `UserInputError`, print its message as one line on stderr and
exit with status 2; everything else is a bug and keeps its traceback. Library code warns with
`SettingWarning` (`warnings.warn(message, SettingWarning)`); under `exit_on_user_error` it is
printed as one line, `PROG: warning: message`, instead of Python's two (the file and line of
the `warnings.warn` call, then its source), which say nothing to someone running a command.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import NoReturn


class UserInputError(ValueError):
    """Bad input from the user (path, config, prompt, spec): reported in one line, exit 2."""


class SettingWarning(UserWarning):
    """A setting that runs but whose result is degenerate (e.g. a k no query has more keys than:
    every selector keeps every key, so it equals dense). The message names the setting and what
    it means."""


def exit_on_user_error(main: Callable[[], object], prog: str) -> NoReturn:
    """Run `main`; turn a `UserInputError` into one line on stderr and exit status 2. While it
    runs, a `SettingWarning` prints as one line `prog: warning: message` on stderr; other
    warnings keep Python's format."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SettingWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        main()
    except UserInputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        warnings.showwarning = shown
    sys.exit(0)
