"""Google Colab: your data from an upload or a mounted Google Drive.

The notebooks are the same ones; their first cell installs ftkit in Colab only (see
docs/colab.md). ``data.path: upload`` opens Colab's upload dialog and reads the uploaded files;
a path under ``/content/drive`` mounts Drive first. Both are said in the cell output, and the
config records the real path, so the reports say which file was read.
"""

from __future__ import annotations

from pathlib import Path

UPLOAD = "upload"
DRIVE = "/content/drive"


def resolve_data_path(data: dict, upload_dir: Path) -> dict:
    """``data`` with ``path: upload`` replaced by the uploaded files (saved under ``upload_dir``), after
    mounting Drive when a path lies on it. Outside Colab ``data`` comes back unchanged."""
    from ftkit.core.session import in_colab

    path = (data or {}).get("path")
    paths = path if isinstance(path, list) else [path]
    if not in_colab() or not any(isinstance(p, str) and (p == UPLOAD or p.startswith(DRIVE)) for p in paths):
        return data
    if any(isinstance(p, str) and p.startswith(DRIVE) for p in paths):
        from google.colab import drive  # only importable inside Colab

        drive.mount(DRIVE)
        print(f"Google Drive mounted at {DRIVE}")
    if UPLOAD not in paths:
        return data
    rest = [p for p in paths if p != UPLOAD]
    earlier = sorted(str(p) for p in upload_dir.glob("*") if p.is_file()) if upload_dir.is_dir() else []
    if earlier:  # uploaded in an earlier notebook of this experiment: the same files, not a new dialog
        print("data.path is 'upload': reading the files uploaded before: " + ", ".join(earlier))
        return {**data, "path": earlier[0] if len(earlier) == 1 and not rest else rest + earlier}
    from google.colab import files

    print("data.path is 'upload': choose your data files (JSONL, CSV, Excel, Parquet...)")
    uploaded = files.upload()
    if not uploaded:
        raise FileNotFoundError("data.path: upload: no file was uploaded; run the cell again and choose a file, "
                                "or set data.path to a file on your mounted Drive")
    upload_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for name, content in uploaded.items():
        target = upload_dir / Path(name).name
        target.write_bytes(content)
        saved.append(str(target))
    print("uploaded: " + ", ".join(saved))
    return {**data, "path": saved[0] if len(saved) == 1 and not rest else rest + saved}
