"""Copy deploy/config/rules.yaml into the omnicrm-rules ConfigMap of config.yaml (kustomize cannot
read files outside its directory); tests/integration/test_deploy_config.py fails when they differ.
Run: python deploy/k8s/sync_rules.py"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "  rules.yaml: |\n"


def main() -> None:
    config = (HERE / "config.yaml").read_text()
    head = config[: config.index(MARK) + len(MARK)]
    rules = (HERE.parent / "config" / "rules.yaml").read_text()
    body = "".join(f"    {line}" if line.strip() else "\n" for line in rules.splitlines(keepends=True))
    (HERE / "config.yaml").write_text(head + body)


if __name__ == "__main__":
    main()
