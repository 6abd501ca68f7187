"""seify's command line on one rank of a torchrun job, which then writes the weights this rank trained to
$RANK_WEIGHTS-<rank>.safetensors: what the two-rank tests compare across ranks (seify writes rank 0's alone)."""
import os
import sys

from safetensors.torch import save_file

import seify.finetune.loop as loop

_run = loop.Trainer.run


def _run_and_keep(self):
    result = _run(self)
    save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
              f"{os.environ['RANK_WEIGHTS']}-{self.dist.rank}.safetensors")
    return result


loop.Trainer.run = _run_and_keep

if __name__ == "__main__":
    from seify.cli import main
    sys.argv = ["seify", *sys.argv[1:]]
    main()
