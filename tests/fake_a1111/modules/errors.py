"""modules.errors: A1111 reports errors of hooks and callbacks and carries on."""

reported: list[str] = []


def report(message, *, exc_info=False):
    import sys

    error = sys.exc_info()[1] if exc_info else None
    reported.append(f"{message}: {error!r}" if error is not None else message)


def display(e, task, *, full_traceback=False):
    reported.append(f"{task}: {e!r}")
