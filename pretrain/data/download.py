"""Download a model's tokenizer (and config, or weights) from the Hugging Face hub.

    python -m pretrain.data.download --repo-id meta-llama/Llama-3.1-8B
    python launch.py model=llama3_8b model.hf_assets_path=~/.cache/pretrain/hf/Llama-3.1-8B

Gated repos (Llama) need a token with access: set HF_TOKEN (or pass --token). The token is never printed.
Failures (offline, 401/404, gated) exit with status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

ASSET_PATTERNS = {
    "tokenizer": ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"],
    "config": ["config.json", "generation_config.json"],
}
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
ASSET_PATTERNS["all"] = ASSET_PATTERNS["tokenizer"] + ASSET_PATTERNS["config"] + WEIGHT_PATTERNS


def default_local_dir(repo_id: str) -> str:
    return os.path.join(os.path.expanduser("~/.cache/pretrain/hf"), repo_id.rstrip("/").split("/")[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data.download", description=__doc__.split("\n")[0])
    parser.add_argument("--repo-id", required=True, help="hub model id, e.g. meta-llama/Llama-3.1-8B")
    parser.add_argument(
        "--assets",
        choices=sorted(ASSET_PATTERNS),
        default="tokenizer",
        help="tokenizer (default) | config | all (tokenizer, config and the safetensors weights)",
    )
    parser.add_argument("--local-dir", default=None, help="where the files go; default ~/.cache/pretrain/hf/<name>")
    parser.add_argument("--token", default=None, help="hub token; prefer HF_TOKEN (not in the process list)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 on success (the path is printed), 1 with a one-line reason otherwise."""
    args = parse_args(argv)
    token = args.token or os.environ.get("HF_TOKEN") or None
    local_dir = os.path.expanduser(args.local_dir or default_local_dir(args.repo_id))
    try:
        # lazy: only a hub source needs huggingface_hub; offline runs never load it
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id=args.repo_id,
            allow_patterns=ASSET_PATTERNS[args.assets],
            local_dir=local_dir,
            token=token,
        )
    except Exception as e:  # every failure becomes one line and status 1, never a traceback
        message = _explain(e, args.repo_id)
        if token:
            message = message.replace(token, "***")
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"downloaded the {args.assets} files of {args.repo_id} to {path}")
    print(f"model.hf_assets_path={path}")
    return 0


def _explain(error: Exception, repo_id: str) -> str:
    # lazy: only a hub source needs huggingface_hub; offline runs never load it
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cause = f"({type(error).__name__})"
    if isinstance(error, GatedRepoError):
        return (
            f"{repo_id} is gated {cause}. Fix: request access on https://huggingface.co/{repo_id}, "
            "then set HF_TOKEN to a token of that account."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id} was not found, or is private and no valid token was given (HTTP 401/404) {cause}. "
            "Fix: check the id, and set HF_TOKEN for private or gated repos."
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", "?")
        return f"the hub answered HTTP {status} for {repo_id} {cause}. Fix: check the id and the token, retry later."
    if isinstance(error, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return (
            f"cannot reach the Hugging Face hub to download {repo_id} {cause}: this machine is offline "
            "(or HF_HUB_OFFLINE=1). Fix: run this command where the hub is reachable and copy the directory, "
            "then set model.hf_assets_path to it."
        )
    return f"downloading {repo_id} failed: {type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
