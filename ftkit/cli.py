"""Command line: ``ftkit serve MODEL_DIR``, ``ftkit check-params FILE``, ``ftkit demo-data PATH``."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="OpenAI-compatible server for a merged model or an adapter directory")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("FTKIT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $FTKIT_API_KEY)")
    s.add_argument("--name", default=None, help="model id clients send (default: the directory name)")
    s.add_argument("--max-tokens-cap", type=int, default=512)

    c = sub.add_parser("check-params", help="validate a parameters YAML file without running anything")
    c.add_argument("file")
    c.add_argument("--top-level-only", action="store_true",
                   help="only reject unknown top-level keys (papermill would merely warn about them)")

    d = sub.add_parser("demo-data", help="write the AcmeCorp demo CSV")
    d.add_argument("path")
    d.add_argument("--n", type=int, default=1000)
    d.add_argument("--seed", type=int, default=42)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "serve":
        from .serve import make_server, serve_forever

        try:
            server = make_server(args.model_dir, args.host, args.port, args.api_key, args.max_tokens_cap, args.name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        serve_forever(server)
        return 0
    if args.command == "check-params":
        from .config import ConfigError, check_top_level, load_config, read_yaml

        try:
            params = read_yaml(args.file)
            check_top_level(params, args.file)
            if not args.top_level_only:
                load_config(params, source=args.file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{args.file}: ok")
        return 0
    if args.command == "demo-data":
        from .demo_data import write_csv

        print(write_csv(args.path, args.n, args.seed))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
