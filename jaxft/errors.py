"""The one base class of jaxft's domain errors.

Every error that means "the input is wrong" (a config key, a file, a tensor, a record, a template) derives from
:class:`JaxftError`, and its message names the place and the fix. The command line turns exactly these (and
``OSError``) into one paragraph and exit status 2; anything else is a bug and keeps its traceback. The concrete
classes also derive from ``ValueError`` where they did before, so ``except ValueError`` in user code still works.
"""


class JaxftError(Exception):
    """Bad input or state that the user can fix; the message says where (file, line, key, tensor) and how."""
