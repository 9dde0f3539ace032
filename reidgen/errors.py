"""The one exception type that means "the user gave us something wrong".

Everything raised as `ReidgenError` reaches the user as a single line (CLI: stderr and a
non-zero exit; HTTP: a 4xx JSON body). Anything else is a bug and keeps its traceback.
"""


class ReidgenError(Exception):
    """Bad input: the message says what was wrong and what is expected."""
