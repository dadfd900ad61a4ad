"""Write README's "Model families" sweep table: every causal-LM model type the installed
transformers lists, classified by tests/_families.classify (exact against its own forward,
refused by name, wrong, crash). Usage: python scripts/families_table.py [OUT.md] [model_type ...]"""

import logging
import pathlib
import sys
import tempfile
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from _families import causal_lm_types, classify  # noqa: E402
from test_families import compare  # noqa: E402


def main(argv):
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    out = pathlib.Path(argv[0]) if argv else None
    rows = ["| model_type | packed pass | detail |", "|---|---|---|"]
    for model_type in argv[1:] or causal_lm_types():
        with tempfile.TemporaryDirectory() as tmp:
            outcome, detail = classify(pathlib.Path(tmp), model_type, compare)
        rows.append(f"| {model_type} | {outcome} | {detail.replace('|', '/')} |")
        print(rows[-1], flush=True)
    if out is not None:
        out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
