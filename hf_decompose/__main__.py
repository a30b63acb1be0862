"""``python -m hf_decompose``: the `hf-decompose` command."""

from .cli import main

raise SystemExit(main())
