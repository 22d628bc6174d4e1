"""fastlora's own error family: the problems a user can fix (a bad file, flag or folder).

Everything fastlora raises on purpose about its input derives from FastloraError, which is a
ValueError, so code written as `except ValueError` keeps working. The `fastlora` command turns
exactly this family (and the operating system's own file errors) into one line and exit 2;
any other exception is a bug in fastlora and keeps its traceback.
"""


class FastloraError(ValueError):
    """Bad input a user can fix; the message names the file, flag or folder at fault."""


class MissingFileError(FastloraError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class RunFolderError(FastloraError):
    """An output folder that cannot take this run: unwritable, locked, or holding another run."""


class TrainingDiverged(FastloraError, RuntimeError):
    """Training cannot go on: its loss, gradients or weights stopped being finite. The message
    names the last checkpoint that was written (every written checkpoint is finite)."""


def naming(where, exc):
    """The message of `exc`, prefixed with `where` (a path or a flag) unless it names it already."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, RecursionError):
        message = f"nested too deeply to read ({message})"
    where = str(where)
    return message if where in message else f"{where}: {message}"
