"""`python -m elastiformer` (and `accelerate launch -m elastiformer train ...`)."""

from .cli import main

main()
