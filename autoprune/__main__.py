"""``python -m autoprune``: the command line (also what ``torchrun -m autoprune`` starts)."""

from autoprune.cli import main

raise SystemExit(main())
