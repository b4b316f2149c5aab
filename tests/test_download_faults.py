"""Download faults: every failure ends in the offline fallback, and no download loses files.

The faults are made for real: a local HTTP server that cuts its response short, zip files with
a corrupt deflate stream, a bad CRC or an encrypted member, a leftover of a killed download and a
cache folder that is a symbolic link.
"""
import http.server
import io
import json
import os
import re
import struct
import threading
import time
import zipfile

import pytest

from maskrcnn_labelme import checkpoints, download

PREFIX = f"pytorch-for-information-extraction-{download.DATASET_COMMIT}/{download.DATASET_SUBDIR}/"
LABEL = json.dumps({"shapes": [], "imagePath": "a.jpg", "imageData": None})
# the names checkpoints.remove_stale_temp removes once their process is gone
STALE_NAME = r"\.(?:.+\.|download-)(\d+)-[0-9a-f]{8}(?:\.tmp)?"


def archive_bytes(compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        zf.writestr(PREFIX + "a.json", LABEL * 50)
        zf.writestr(PREFIX + "a.jpg", b"jpeg bytes")
    return buffer.getvalue()


def write_archive(path, data=None):
    path.write_bytes(archive_bytes() if data is None else data)
    return path


def dataset_files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def use_cache(monkeypatch, cache, url):
    monkeypatch.setattr(download, "DATA_CACHE", cache)
    monkeypatch.setattr(download, "DATASET_URL", url)
    return cache / "student-id"


# --- a local HTTP server that misbehaves --------------------------------------------------------

@pytest.fixture
def serve():
    """Start a local HTTP server whose GET is `respond(handler)`; it answers at most `requests`
    requests and is shut down when the test ends."""
    started = []

    def start(respond, requests=1):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.server.handled += 1
                respond(self)
                self.close_connection = True

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        server.timeout = 0.1
        server.handled = 0
        stop = threading.Event()

        def loop():
            while server.handled < requests and not stop.is_set():
                server.handle_request()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        started.append((server, thread, stop))
        return f"http://127.0.0.1:{server.server_address[1]}/student-id.zip"

    yield start
    for server, thread, stop in started:
        stop.set()
        thread.join(timeout=10)
        server.server_close()
        assert not thread.is_alive()


def cut_chunked(handler):
    """One whole chunk, then a chunk that promises 4096 bytes and breaks off after 100."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/zip")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    data = archive_bytes()
    handler.wfile.write(b"%x\r\n%s\r\n" % (100, data[:100]))
    handler.wfile.write(b"%x\r\n%s" % (4096, data[100:200]))
    handler.wfile.flush()
    handler.connection.shutdown(2)  # mid-stream: no closing chunk


def test_a_cut_short_chunked_response_falls_back_to_the_sample(serve, tmp_path, monkeypatch,
                                                                 capsys):
    """http.client.IncompleteRead is no OSError: it used to escape as a raw traceback."""
    use_cache(monkeypatch, tmp_path / "cache", serve(cut_chunked))
    assert download.get_dataset_dir(None) == download.SAMPLE_DIR
    out = capsys.readouterr().out
    assert "Could not download" in out and "DATA_DIR" in out
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_cut_short_response_is_a_download_error_naming_the_url(serve, tmp_path):
    url = serve(cut_chunked)
    with pytest.raises(download.DownloadError, match=re.escape(url)) as caught:
        download.download_student_id(tmp_path / "student-id", url)
    assert "IncompleteRead" in str(caught.value)


def test_a_response_shorter_than_its_content_length_fails(serve, tmp_path):
    """http.client returns a short body without complaint; a whole zip that stops early must
    still count as a failed download, not as the dataset."""
    def short(handler):
        data = archive_bytes()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data) + 1000))
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()
        handler.connection.shutdown(2)

    url = serve(short)
    dest = tmp_path / "cache" / "student-id"
    with pytest.raises(download.DownloadError, match=f"{re.escape(url)}.*1000 bytes short"):
        download.download_student_id(dest, url)
    assert list(dest.parent.iterdir()) == []


# --- broken archives ----------------------------------------------------------------------------

def corrupt(data, fault):
    """Break the archive's a.json member: 'deflate' (zlib.error), 'crc' (BadZipFile "Bad CRC")
    or 'encrypted' (RuntimeError "... is encrypted, password required")."""
    data = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(PREFIX + "a.json")
    start = info.header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, start + 26)
    payload = start + 30 + name_len + extra_len
    if fault == "deflate":
        assert info.compress_type == zipfile.ZIP_DEFLATED
        data[payload:payload + 8] = b"\xff" * 8  # BTYPE 11: an invalid deflate block
    elif fault == "crc":
        data[payload + 5] ^= 0xFF
    else:  # set the 'encrypted' flag bit in the local header and the central directory entry
        struct.pack_into("<H", data, start + 6, info.flag_bits | 0x1)
        central = data.index(b"PK\x01\x02")
        while struct.unpack_from("<I", data, central + 42)[0] != start:
            central = data.index(b"PK\x01\x02", central + 4)
        struct.pack_into("<H", data, central + 8, info.flag_bits | 0x1)
    return bytes(data)


@pytest.mark.parametrize("fault,compression", [
    ("deflate", zipfile.ZIP_DEFLATED), ("crc", zipfile.ZIP_STORED),
    ("encrypted", zipfile.ZIP_STORED),
])
def test_a_broken_archive_falls_back_to_the_sample(fault, compression, tmp_path, monkeypatch,
                                                   capsys):
    archive = write_archive(tmp_path / "repo.zip", corrupt(archive_bytes(compression), fault))
    use_cache(monkeypatch, tmp_path / "cache", archive.as_uri())
    assert download.get_dataset_dir(None) == download.SAMPLE_DIR
    assert "Could not download" in capsys.readouterr().out
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("fault,compression,cause", [
    ("deflate", zipfile.ZIP_DEFLATED, "zlib"), ("crc", zipfile.ZIP_STORED, "Bad CRC"),
    ("encrypted", zipfile.ZIP_STORED, "encrypted"),
])
def test_a_broken_archive_is_a_download_error_naming_url_and_cause(fault, compression, cause,
                                                                   tmp_path):
    archive = write_archive(tmp_path / "repo.zip", corrupt(archive_bytes(compression), fault))
    with pytest.raises(download.DownloadError) as caught:
        download.download_student_id(tmp_path / "cache" / "student-id", archive.as_uri())
    assert archive.as_uri() in str(caught.value) and cause in str(caught.value)
    assert isinstance(caught.value, OSError)  # callers catching OSError still catch it


def test_download_error_is_exported():
    assert "DownloadError" in download.__all__


# --- temporary folders --------------------------------------------------------------------------

def dead_pid():
    pid = 999999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid += 1


@pytest.mark.skipif(os.name == "nt", reason="a process' liveness cannot be told there")
def test_a_killed_downloads_leftover_is_removed_by_the_next_download(tmp_path):
    cache = tmp_path / "cache"
    leftover = cache / f".download-{dead_pid()}-abcdef12"
    leftover.mkdir(parents=True)
    (leftover / "dataset.zip").write_bytes(b"half an archive")
    archive = write_archive(tmp_path / "repo.zip")
    download.download_student_id(cache / "student-id", archive.as_uri())
    assert [p.name for p in cache.iterdir()] == ["student-id"]
    assert dataset_files(cache / "student-id") == ["SOURCE.md", "a.jpg", "a.json"]


def test_a_running_download_names_its_folder_for_remove_stale_temp(serve, tmp_path):
    """While a download runs its folder carries this process' ID (so a kill -9 leftover is found
    later, and a live one is left alone); when it fails the folder is removed."""
    release = threading.Event()

    def stall(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        handler.wfile.write(b"PK" + b"\0" * 98)
        handler.wfile.flush()
        release.wait(timeout=20)
        handler.connection.shutdown(2)

    url = serve(stall)
    cache = tmp_path / "cache"
    errors = []

    def fetch():
        try:
            download.download_student_id(cache / "student-id", url)
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (cache.is_dir() and list(cache.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        names = [p.name for p in cache.iterdir()]
        assert len(names) == 1
        match = re.fullmatch(STALE_NAME, names[0])
        assert match and names[0].startswith(".download-")
        assert match.group(1) == str(os.getpid())
        assert checkpoints.remove_stale_temp(cache) == []  # a live download is left alone
    finally:
        release.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], download.DownloadError)
    assert list(cache.iterdir()) == []


# --- the cache folder: never delete a user's files, follow a symbolic link ----------------------

def test_an_incomplete_cache_folder_is_moved_aside_not_deleted(tmp_path, capsys):
    cache = tmp_path / "cache"
    dest = cache / "student-id"
    dest.mkdir(parents=True)
    (dest / "mine.json").write_text('{"my": "work"}')
    archive = write_archive(tmp_path / "repo.zip")
    download.download_student_id(dest, archive.as_uri())
    assert dataset_files(dest) == ["SOURCE.md", "a.jpg", "a.json"]
    aside = [p for p in cache.iterdir() if p.name.startswith("student-id.incomplete-")]
    assert len(aside) == 1
    assert (aside[0] / "mine.json").read_text() == '{"my": "work"}'
    out = capsys.readouterr().out
    assert aside[0].name in out and out.count("\n") == 1
    # a second forced download moves the first dataset aside under another name
    download.download_student_id(dest, archive.as_uri())
    assert len([p for p in cache.iterdir() if p.name.startswith("student-id.incomplete-")]) == 2


def test_a_failed_download_leaves_an_incomplete_cache_folder_alone(tmp_path):
    dest = tmp_path / "cache" / "student-id"
    dest.mkdir(parents=True)
    (dest / "mine.json").write_text("{}")
    broken = write_archive(tmp_path / "broken.zip", b"not a zip")
    with pytest.raises(download.DownloadError):
        download.download_student_id(dest, broken.as_uri())
    assert [p.name for p in dest.parent.iterdir()] == ["student-id"]
    assert [p.name for p in dest.iterdir()] == ["mine.json"]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
@pytest.mark.parametrize("target_state", ["missing", "empty", "incomplete"])
def test_a_symlinked_cache_folder_is_filled_through_the_link(target_state, tmp_path, monkeypatch,
                                                             capsys):
    """data/cache/student-id may link to a folder on another disk: the dataset goes there, the
    link stays a link, and files already there are moved aside beside the target."""
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    target = other_disk / "student-id"
    if target_state != "missing":
        target.mkdir()
    if target_state == "incomplete":
        (target / "mine.json").write_text("{}")
    cache = tmp_path / "cache"
    cache.mkdir()
    link = cache / "student-id"
    link.symlink_to(target, target_is_directory=True)
    archive = write_archive(tmp_path / "repo.zip")
    assert use_cache(monkeypatch, cache, archive.as_uri()) == link

    assert download.get_dataset_dir(None) == link
    assert "Downloaded the student-ID dataset" in capsys.readouterr().out
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert dataset_files(link) == ["SOURCE.md", "a.jpg", "a.json"]
    assert (link / ".complete").is_file()
    assert [p.name for p in cache.iterdir()] == ["student-id"]
    beside = sorted(p.name for p in other_disk.iterdir())
    if target_state == "incomplete":
        assert len(beside) == 2 and beside[1].startswith("student-id.incomplete-")
        assert (other_disk / beside[1] / "mine.json").is_file()
    else:
        assert beside == ["student-id"]
    # the next run reuses it through the link
    assert download.get_dataset_dir(None) == link
    assert "downloaded earlier" in capsys.readouterr().out


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_a_link_to_a_disconnected_disk_falls_back_and_says_where_it_points(tmp_path, monkeypatch,
                                                                           capsys):
    """A link whose target folder's parent is missing (an unplugged disk) is not created on the
    wrong disk: the download fails, naming the link target, and the sample is used."""
    cache = tmp_path / "cache"
    cache.mkdir()
    target = tmp_path / "unplugged" / "student-id"
    (cache / "student-id").symlink_to(target, target_is_directory=True)
    use_cache(monkeypatch, cache, write_archive(tmp_path / "repo.zip").as_uri())
    assert download.get_dataset_dir(None) == download.SAMPLE_DIR
    assert str(target) in capsys.readouterr().out
    assert not (tmp_path / "unplugged").exists() and (cache / "student-id").is_symlink()
