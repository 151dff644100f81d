"""Exit codes of the non-Lightning commands (DESIGN "Exit codes"), defined once for every command."""
from __future__ import annotations

EXIT_OK = 0  # all done
EXIT_USAGE = 2  # usage error or refused run; the message gives the reason and the fix
EXIT_SOME_FAILED = 3  # some inputs failed, were missing or did not match; each is listed
EXIT_INTERRUPTED = 130  # Ctrl-C: what was kept and the command that resumes are printed
