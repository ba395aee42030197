"""Weights by name: downloads from a real HTTP server on 127.0.0.1 (serving an .npz the test writes) into the
cache, resumed, checked and atomic; the table of Google's releases; and a wheel that carries the recipes."""
import hashlib
import http.server
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_models import randomize, write_google_npz
from vit_train import hub
from vit_train.cli import eval_main, train_main
from vit_train.config import CONFIGS_DIR
from vit_train.errors import UserError
from vit_train.hub import RELEASES, Release, check_weights_source, fetch, size_matches
from vit_train.models import get_config
from vit_train.models.vit import create_model
from vit_train.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    """A real HTTP server in a thread. It serves `files` ({url path: bytes}), honours Range requests unless
    `honour_range` is False, and records each request as (path, its Range header). `cut` = {n: k}: the n-th
    response (from 1) sends only k bytes of its body, then closes the connection. `delay`: seconds before a body."""
    state = SimpleNamespace(files={}, requests=[], cut={}, honour_range=True, delay=0.0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                return self.send_error(404)
            start = 0
            wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if wanted and state.honour_range:
                start = int(wanted[1])
                if start >= len(body):
                    return self.send_error(416)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            time.sleep(state.delay)
            self.wfile.write(body[start:][:state.cut.get(len(state.requests))])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(the bytes of a Google-layout .npz of the `testing` model, that model)."""
    model = randomize(create_model("testing", num_classes=10))
    path = tmp_path_factory.mktemp("weights") / "testing.npz"
    write_google_npz(path, model.state_dict(), get_config("testing").transformer.num_heads)
    return path.read_bytes(), model


def serve(server, body, path="/testing.npz", **kwargs) -> Release:
    """A release of the `testing` model (10 classes, 32 px) at `path` on the server."""
    server.files[path] = body
    return Release("testing", "test weights", server.url + path, 10, 32, **kwargs)


def test_a_download_shows_progress_and_the_second_call_is_a_cache_hit(server, weights, tmp_path, capsys):
    body, _ = weights
    release = serve(server, body)
    path = fetch("testing-w", release, tmp_path)
    assert path == tmp_path / "testing-w.npz" and path.read_bytes() == body
    progress = capsys.readouterr().err  # tqdm's bar, at its end: all bytes of the file
    assert "testing-w: 100%" in progress and f"{len(body) / 1024:.1f}k/{len(body) / 1024:.1f}k" in progress
    assert (tmp_path / "testing-w.npz.sha256").read_text().strip() == hashlib.sha256(body).hexdigest()
    assert fetch("testing-w", release, tmp_path) == path
    assert len(server.requests) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["testing-w.npz", "testing-w.npz.sha256"]  # no .part


def test_a_released_name_loads_the_downloaded_file(server, weights, tmp_path, monkeypatch):
    body, source = weights
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "testing-local", serve(server, body))
    model = create_model("testing", num_classes=10)
    assert load_pretrained(model, "testing-local") == []
    assert (tmp_path / "cache" / "testing-local.npz").read_bytes() == body
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_broken_transfer_resumes_with_a_range_request(server, weights, tmp_path, capsys):
    body, _ = weights
    server.cut = {1: len(body) // 3}
    path = fetch("testing-w", serve(server, body), tmp_path)
    assert path.read_bytes() == body
    assert server.requests == [("/testing.npz", None), ("/testing.npz", f"bytes={len(body) // 3}-")]
    assert "resuming" in capsys.readouterr().err


def test_a_transfer_that_stops_is_refused_and_the_next_run_resumes_it(server, weights, tmp_path):
    body, _ = weights
    cut = len(body) // 4
    release = serve(server, body)
    server.honour_range, server.cut = False, {1: cut, 2: cut}  # the second try starts over and breaks as early
    with pytest.raises(UserError, match=f"stopped at {cut:,} of {len(body):,} bytes.*resume") as error:
        fetch("testing-w", release, tmp_path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "testing-w.npz").exists() and (tmp_path / "testing-w.npz.part").stat().st_size == cut
    server.honour_range = True
    assert fetch("testing-w", release, tmp_path).read_bytes() == body
    assert server.requests[-1] == ("/testing.npz", f"bytes={cut}-")


def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(server, weights, tmp_path):
    body, _ = weights
    with pytest.raises(UserError, match=f"SHA-256 {hashlib.sha256(body).hexdigest()}, not the 0+ published"):
        fetch("testing-w", serve(server, body, sha256="0" * 64), tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert fetch("testing-w", serve(server, body, sha256=hashlib.sha256(body).hexdigest()), tmp_path).exists()


def test_an_error_page_is_refused_by_the_listed_size(server, tmp_path):
    page = b"<html>Sign in to the hotel Wi-Fi</html>"
    with pytest.raises(UserError, match=f"is {len(page):,} bytes, not the 391 MiB Google lists"):
        fetch("testing-w", serve(server, page, size="391 MiB"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_listed_sizes_match_to_their_last_digit():
    assert size_matches(int(393.69 * 2**20), "393.69 MiB") and size_matches(int(393.694 * 2**20), "393.69 MiB")
    assert not size_matches(int(393.71 * 2**20), "393.69 MiB")
    assert size_matches(int(391.8 * 2**20), "391 MiB") and not size_matches(int(392.5 * 2**20), "391 MiB")
    assert size_matches(int(1.225 * 2**30), "1.22 GiB") and not size_matches(int(1.24 * 2**30), "1.22 GiB")


def test_a_cached_file_that_changed_is_removed_then_downloaded_again(server, weights, tmp_path):
    body, _ = weights
    release = serve(server, body)
    path = fetch("testing-w", release, tmp_path)
    path.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # one bit flipped on disk
    with pytest.raises(UserError, match="recorded at its first download.*removed.*again"):
        fetch("testing-w", release, tmp_path)
    assert not path.exists() and (tmp_path / "testing-w.npz.sha256").exists()
    assert fetch("testing-w", release, tmp_path).read_bytes() == body
    assert len(server.requests) == 2


def test_a_changed_file_on_the_server_is_refused_against_the_recorded_checksum(server, weights, tmp_path):
    body, _ = weights
    release = serve(server, body)
    fetch("testing-w", release, tmp_path).unlink()  # downloaded once, then deleted by hand
    server.files["/testing.npz"] = body[::-1]
    with pytest.raises(UserError, match="recorded at its first download; nothing was kept; if Google replaced"):
        fetch("testing-w", release, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["testing-w.npz.sha256"]


def test_processes_waiting_on_the_cache_share_one_download(server, weights, tmp_path):
    body, _ = weights
    release = serve(server, body)
    server.delay = 0.3  # both start before either has finished
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(fetch("testing-w", release, tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 2 and paths[0].read_bytes() == body
    assert len(server.requests) == 1


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/testing.npz"  # nothing listens there once the socket is closed


def test_server_down_is_one_line_and_exit_2_with_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    url = closed_port_url()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "testing-local", Release("testing", "test weights", url, 10, 32))
    status = train_main(["--model", "testing", "--dataset", "synthetic", "--pretrained", "testing-local",
                         "--img-size", "32", "--batch-size", "8", "--steps", "1", "--device", "cpu",
                         "--output-dir", "runs"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot download testing-local from {url} (")
    assert str(tmp_path / "cache" / "testing-local.npz") in err
    assert not (tmp_path / "runs").exists() and list((tmp_path / "cache").iterdir()) == []


def test_an_unknown_name_says_how_to_list_the_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--model", "testing", "--dataset", "synthetic", "--pretrained", "ViT-B_16-i22k"]) == 2
    assert eval_main(["--model", "testing", "--pretrained", "ViT-B_16-i22k"]) == 2
    for line in capsys.readouterr().err.splitlines():
        assert "ViT-B_16-i22k are neither a file nor a released name" in line and "--list-pretrained" in line


def test_a_released_name_of_another_model_is_refused_before_the_download():
    with pytest.raises(UserError, match="ViT-L_16-i21k holds ViT-L_16 weights and the model is ViT-B_16; add "
                                        "--model ViT-L_16"):
        check_weights_source("ViT-L_16-i21k", "ViT-B_16")
    check_weights_source("ViT-L_16-i21k", "ViT-L_16")


def test_list_pretrained_shows_every_release(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path))
    assert train_main(["--list-pretrained"]) == 0
    listed = capsys.readouterr().out
    assert eval_main(["--list-pretrained"]) == 0
    assert capsys.readouterr().out == listed
    for name, release in RELEASES.items():
        assert re.search(rf"^{re.escape(name)} +{re.escape(release.model)} .* {re.escape(release.url)}$", listed,
                         re.MULTILINE)
    assert f"cache: {tmp_path}" in listed


def test_every_release_is_a_model_we_build_at_a_google_url():
    assert {"ViT-B_16-i21k", "ViT-B_32-i21k", "ViT-L_16-i21k", "ViT-L_32-i21k", "ViT-H_14-i21k",
            "R50-ViT-B_16-i21k", "ViT-B_16-i21k-i1k-384", "ViT-B_16-augreg-i21k"} <= set(RELEASES)
    for name, release in RELEASES.items():
        get_config(release.model)  # raises for a name the size table does not parse
        assert name.startswith(release.model + "-")
        assert release.url.startswith(hub.BUCKET) and release.url.endswith(".npz") and "+" not in release.url
        assert release.size is None or re.fullmatch(r"\d+(\.\d+)? (MiB|GiB)", release.size)
    assert RELEASES["R50-ViT-B_16-i21k"].url == \
        "https://storage.googleapis.com/vit_models/imagenet21k/R50%2BViT-B_16.npz"


def test_the_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VIT_TRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "vit-train"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "vit-train"


def test_the_wheel_carries_the_recipes_and_runs_them_from_elsewhere(tmp_path):
    source = tmp_path / "source"  # the build writes build/ and *.egg-info beside the sources: not in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("vit_train", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("vit_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"vit_train/configs/{path.name}" for path in CONFIGS_DIR.glob("*.py")}
    assert recipes and recipes <= names
    modules = {str(path.relative_to(REPO)) for path in (REPO / "vit_train").rglob("*.py")}
    assert modules <= names, f"not in the wheel: {sorted(modules - names)}"

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    run = subprocess.run(
        [sys.executable, "-c", "import vit_train, vit_train.config as c; c.load_recipe('cifar100_scratch'); "
                               "print(vit_train.__file__); print(c.CONFIGS_DIR)"],
        cwd=tmp_path, env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(installed / "vit_train" / "__init__.py"), str(installed / "vit_train" /
                                                                                    "configs")]


# ---------------------------------------------------------------------------------------------------------------
# A file is trusted, and its checksum recorded, only once it loads as the release it claims

def test_a_truncated_download_is_not_recorded_and_does_not_lock_the_genuine_file_out(server, weights, tmp_path):
    body, _ = weights
    release = serve(server, body[: len(body) // 2])  # no listed size: only the layout can tell
    with pytest.raises(UserError, match=r"is not testing's weights \(not a \.npz.*nothing was kept") as error:
        fetch("testing-w", release, tmp_path)
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []  # no checksum recorded for it
    server.files["/testing.npz"] = body
    assert fetch("testing-w", release, tmp_path).read_bytes() == body
    assert (tmp_path / "testing-w.npz.sha256").read_text().strip() == hashlib.sha256(body).hexdigest()


def test_a_stale_part_resumed_to_the_full_size_starts_over(server, weights, tmp_path, capsys):
    body, _ = weights
    stale = bytes(reversed(body))[: len(body) // 2]  # an earlier attempt's bytes, of another file
    (tmp_path / "testing-w.npz.part").write_bytes(stale)
    path = fetch("testing-w", serve(server, body, size=None), tmp_path)
    assert path.read_bytes() == body
    assert server.requests == [("/testing.npz", f"bytes={len(stale)}-"), ("/testing.npz", None)]
    assert "starting it over" in capsys.readouterr().err
    assert (tmp_path / "testing-w.npz.sha256").read_text().strip() == hashlib.sha256(body).hexdigest()


def test_another_models_weights_are_refused_by_their_shapes(server, tmp_path):
    other = tmp_path / "other.npz"
    model = randomize(create_model("testing", num_classes=100))  # a head of 100 classes, not the release's 10
    write_google_npz(other, model.state_dict(), get_config("testing").transformer.num_heads)
    with pytest.raises(UserError, match=r"head/bias has shape \(100,\), not \(10,\)"):
        fetch("testing-w", serve(server, other.read_bytes()), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_vit_eval_refuses_a_release_whose_head_cannot_fit_the_dataset_before_downloading(server, weights, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setenv("VIT_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "testing-i1k", Release("testing", "test weights", server.url + "/big.npz", 1000,
                                                         32))
    status = eval_main(["--model", "testing", "--pretrained", "testing-i1k", "--dataset", "synthetic",
                        "--img-size", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: testing-i1k has a head of 1000 classes and the dataset 10")
    assert server.requests == [] and not (tmp_path / "cache").exists()
