"""Builds the local stand-ins for the tools Pants 2.17 downloads from GitHub and writes their settings.

Run by ./pants with the tools venv's Python: `make_tools.py DIR`. Writes DIR/tools/* and DIR/pants.rc.
Outputs are byte-reproducible (fixed zip timestamps), so their hashes are stable across machines.
"""

import hashlib
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

PEX_VERSION = "v2.1.137"
PROTOC_VERSION = "35.1"
GRPC_PLUGIN_VERSION = "1.85.1"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def pants_platform() -> str:
    machine = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
    return f"{'macos' if sys.platform == 'darwin' else 'linux'}_{machine}"


def build_pex_cli(venv: Path, dest: Path) -> None:
    # --no-strip-pex-env: otherwise the pex CLI ignores the PEX_ROOT Pants gives it and caches in ~/.pex.
    subprocess.run(
        [str(venv / "bin" / "pex"), f"pex=={PEX_VERSION.lstrip('v')}", "-c", "pex", "--no-strip-pex-env", "-o", str(dest)],
        check=True,
    )


def build_protoc_zip(venv: Path, dest: Path) -> None:
    # Pants unpacks the zip and runs bin/protoc; protoc finds the well-known types in ../include.
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        entries = [(venv / "bin" / "protoc", "bin/protoc")]
        include = venv / "include"
        entries += [(p, p.relative_to(venv).as_posix()) for p in sorted(include.rglob("*.proto"))]
        for src, name in entries:
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.external_attr = (0o755 if name == "bin/protoc" else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, src.read_bytes())


def build_grpc_plugin(venv: Path, dest: Path) -> None:
    source = Path(__file__).with_name("protoc_gen_grpc_python.py").read_text()
    dest.write_text(f"#!{venv / 'bin' / 'python'}\n{source}")
    dest.chmod(0o755)


def known_version(version: str, path: Path) -> str:
    data = path.read_bytes()
    return f"{version}|{pants_platform()}|{hashlib.sha256(data).hexdigest()}|{len(data)}"


def main() -> None:
    root = Path(sys.argv[1])
    venv, tools = root / "tools-venv", root / "tools"
    tools.mkdir(exist_ok=True)
    pex, protoc, plugin = tools / "pex", tools / f"protoc-{PROTOC_VERSION}.zip", tools / "grpc_python_plugin"
    build_pex_cli(venv, pex)
    build_protoc_zip(venv, protoc)
    build_grpc_plugin(venv, plugin)

    ca_certs = next(
        (c for c in (os.environ.get("SSL_CERT_FILE"), os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt")
         if c and Path(c).is_file()),
        None,
    )
    lines = []
    if ca_certs:  # TLS to the package index may be intercepted: trust the system bundle, not certifi's
        lines += ["[GLOBAL]", f'ca_certs_path = "{ca_certs}"', ""]
    for section, version, path in (
        ("pex-cli", PEX_VERSION, pex),
        ("protoc", PROTOC_VERSION, protoc),
        ("grpc-python-plugin", GRPC_PLUGIN_VERSION, plugin),
    ):
        lines += [
            f"[{section}]",
            f'version = "{version}"',
            f'known_versions = ["{known_version(version, path)}"]',
            f'url_template = "file://{path}"',
            "",
        ]
    (root / "pants.rc").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
