"""`python -m grpo_trainer` == `grpo-lambda`."""
import sys

from .cli import main

sys.exit(main())
