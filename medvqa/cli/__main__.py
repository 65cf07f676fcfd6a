"""`python -m medvqa.cli ...`, e.g. under `accelerate launch -m medvqa.cli train ...`."""

from medvqa.cli import main

main()
