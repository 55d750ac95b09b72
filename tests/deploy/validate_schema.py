"""Validates YAML documents against a JSON Schema (draft 2020-12) with PyPI `jsonschema`.

Used for the pieces of portcullis's manifests that no published CRD schema covers (see
schemas/). Usage: python3 validate_schema.py SCHEMA.json FILE.yaml...
Prints one line per error and exits 1 when there is any.
"""

import json
import sys

import jsonschema
import yaml


def main(argv):
    if len(argv) < 3:
        print("usage: validate_schema.py SCHEMA.json FILE.yaml...", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        schema = json.load(f)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    failed = False
    for path in argv[2:]:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for i, doc in enumerate(docs):
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for e in errors:
                where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
                print(f"FAIL {path}#{i} {where}: {e.message}")
            failed |= bool(errors)
            if not errors:
                print(f"ok {path}#{i} against {argv[1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
