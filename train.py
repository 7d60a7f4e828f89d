"""Continual fine-tuning with CRMA: ``python train.py fit --config configs/tiny.yaml``.

``fit``/``validate``/``test`` are LightningCLI (``python train.py fit --help`` lists every option);
``predict``/``route``/``export`` and ``test --run <dir>`` use a finished run (``crma_lightning.serve.cli``,
docs/inference.md); ``plan --config ...`` prints the memory plan of a config (``crma_lightning.plan``).
"""

import sys

from crma_lightning.cli import main

if __name__ == "__main__":
    on_run = any(a == "--run" or a.startswith("--run=") for a in sys.argv[2:])
    if len(sys.argv) > 1 and (sys.argv[1] in ("predict", "route", "export") or (sys.argv[1] == "test" and on_run)):
        from crma_lightning.serve.cli import main as serve_main

        serve_main(sys.argv[1:])
    elif len(sys.argv) > 1 and sys.argv[1] == "plan":
        from crma_lightning.plan import main as plan_main

        plan_main(sys.argv[2:])
    else:
        main()
