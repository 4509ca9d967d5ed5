"""torchrun for our launchers, without its report of a failed worker: the worker has already said what went wrong in
one line, and the 30-line ChildFailedError traceback after it buries that line.

    python -m causalvdm.cli.launch --nproc_per_node 2 -m causalvdm.cli.train CONFIG ...   # torchrun's arguments

The exit code is the failed worker's. A worker killed by a signal (it could not say anything itself) gets one line
naming the signal. `--debug` among the worker's arguments, or CAUSALVDM_DEBUG=1, keeps torchrun's full report.
"""

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from causalvdm.cli.common import DEBUG_ENV, debugging


def main(argv=None) -> int:
    """Run torchrun with `argv` -> 0, or the exit code of the first worker that failed."""
    args = get_args_parser().parse_args(argv)
    debug = debugging() or "--debug" in args.training_script_args
    if not debug:  # its "failed (exitcode: N) local_rank: ..." line repeats what the report would say
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as err:  # Ctrl-C or SIGTERM to torchrun: it passed the signal on to the workers
        if debug:
            raise
        print(f"error: stopped by {err.sigval.name}; the workers were passed the signal (a training run saves a "
              "checkpoint first)", file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        if debug:
            raise
        rank, failure = err.get_first_failure()
        if failure.exitcode < 0:
            try:
                name = signal.Signals(-failure.exitcode).name
            except ValueError:
                name = f"signal {-failure.exitcode}"
            hint = " (often: out of memory)" if name == "SIGKILL" else ""
            print(f"error: worker rank {rank} was killed by {name}{hint}; {DEBUG_ENV}=1 shows torchrun's report",
                  file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
