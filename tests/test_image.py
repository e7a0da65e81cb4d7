"""Decoding one channel file: good formats read, each kind of bad file gets its own error."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from agent.stacks import image
from agent.stacks.errors import StackError
from agent.stacks.image import Limits, open_channel, read_channel
from tests.conftest import REPO
from tests.helpers import refuse_open, write_png


def _error(path: Path, limits: Limits = Limits()) -> StackError:
    with pytest.raises(StackError) as info:
        read_channel(path, limits)
    assert str(path) in str(info.value), "the error must name the file"
    return info.value


def test_reads_8_bit_png_with_its_sha256(tmp_path: Path) -> None:
    pixels = np.arange(60 * 40, dtype=np.uint32).reshape(60, 40).astype(np.uint8)
    path = write_png(tmp_path / "a.png", pixels)
    channel = read_channel(path)
    assert channel.pixels.dtype == np.uint8
    np.testing.assert_array_equal(channel.pixels, pixels)
    assert channel.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_16_bit_png_of_any_size(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 4096, (37, 101)).astype(np.uint16)
    channel = read_channel(write_png(tmp_path / "a.png", pixels))
    assert channel.pixels.dtype == np.uint16
    np.testing.assert_array_equal(channel.pixels, pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("ome", [False, True])
def test_reads_tiff_and_single_plane_ome_tiff(tmp_path: Path, dtype: type, ome: bool) -> None:
    pixels: np.ndarray = np.random.default_rng(1).integers(0, np.iinfo(dtype).max, (48, 64)).astype(dtype)
    path = tmp_path / ("a.ome.tif" if ome else "a.tif")
    tifffile.imwrite(path, pixels, ome=ome, photometric="minisblack")
    channel = read_channel(path)
    assert channel.header.format == "tiff"
    np.testing.assert_array_equal(channel.pixels, pixels)


def test_grayscale_saved_as_rgb_is_accepted(tmp_path: Path) -> None:
    gray = np.random.default_rng(2).integers(0, 255, (20, 30)).astype(np.uint8)
    channel = read_channel(write_png(tmp_path / "a.png", np.dstack([gray, gray, gray])))
    np.testing.assert_array_equal(channel.pixels, gray)


def test_missing_file(tmp_path: Path) -> None:
    assert _error(tmp_path / "nothing.png").code == "missing_file"


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    assert _error(path).code == "empty_file"


def test_truncated_png(tmp_path: Path) -> None:
    whole = write_png(
        tmp_path / "whole.png", np.random.default_rng(3).integers(0, 255, (64, 64)).astype(np.uint8)
    )
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert _error(cut).code == "truncated"


def test_truncated_tiff(tmp_path: Path) -> None:
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, np.random.default_rng(4).integers(0, 255, (64, 64)).astype(np.uint8))
    data = whole.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    assert _error(cut).code in ("truncated", "corrupt")


def test_png_with_corrupt_pixel_data(tmp_path: Path) -> None:
    whole = write_png(
        tmp_path / "a.png", np.random.default_rng(5).integers(0, 255, (64, 64)).astype(np.uint8)
    )
    data = bytearray(whole.read_bytes())
    data[60:200] = bytes(140)  # zero out part of the compressed IDAT stream, keep the IEND
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    assert _error(bad).code == "corrupt"


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "x_red.png"
    path.write_text("this is a lab note, not an image\n")
    err = _error(path)
    assert err.code == "not_an_image"
    assert "PNG or TIFF" in err.message


def test_colour_image_where_grayscale_is_expected(tmp_path: Path) -> None:
    colour = np.random.default_rng(6).integers(0, 255, (20, 30, 3)).astype(np.uint8)
    assert _error(write_png(tmp_path / "c.png", colour)).code == "colour_image"


def test_float_tiff_is_an_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, np.random.default_rng(7).random((16, 16)).astype(np.float32))
    err = _error(path)
    assert err.code == "unsupported_dtype"
    assert "32-bit" in err.message


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    assert _error(path).code == "multi_page"


def _forge_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite IHDR's size (and its CRC), as a decompression bomb's header would claim."""
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return data[:12] + bytes(ihdr) + crc + data[33:]


def test_absurd_dimensions_are_refused_before_decoding(tmp_path: Path) -> None:
    small = write_png(tmp_path / "small.png", np.zeros((8, 8), np.uint8))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_forge_png_size(small.read_bytes(), 200_000, 200_000))
    err = _error(bomb)
    assert err.code == "too_large"
    assert "200000 x 200000" in err.message


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    path = write_png(tmp_path / "a.png", np.zeros((100, 100), np.uint8))
    assert read_channel(path, Limits(max_pixels=10_000)).pixels.shape == (100, 100)
    assert _error(path, Limits(max_pixels=9_999)).code == "too_large"


def test_directory_named_like_a_channel(tmp_path: Path) -> None:
    folder = tmp_path / "x_red.png"
    folder.mkdir()
    assert _error(folder).code == "not_a_file"


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO, errno.ESTALE, errno.ETIMEDOUT])
def test_an_open_failing_for_the_surroundings_is_raised_as_it_is_not_as_a_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Too many open files, a failing disk or network share: nothing about the file, so no
    StackError (which would file the stack in failed/); the agent tries it again."""
    path = write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    refuse_open(monkeypatch, path.name, code)
    with pytest.raises(OSError, match=os.strerror(code)) as info:
        read_channel(path)
    assert not isinstance(info.value, StackError)
    assert info.value.errno == code


def test_unreadable_file_gives_permission_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = write_png(tmp_path / "secret.png", np.zeros((8, 8), np.uint8))
        path.chmod(0o000)
        assert _error(path).code == "unreadable"
        return
    # root reads anything: check as an unprivileged user in a child process, in a folder that
    # user can enter (pytest's own temp folders are private to root).
    folder = Path(tempfile.mkdtemp(prefix="hpa-edge-perm-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = write_png(folder / "secret.png", np.zeros((8, 8), np.uint8))
        path.chmod(0o000)
        lines = _read_as_nobody(path).splitlines()
        assert lines[0] == "unreadable", lines
        assert str(path) in lines[1]
    finally:
        shutil.rmtree(folder)


def _read_as_nobody(path: Path) -> str:
    """read_channel in a forked child that dropped root: modules are loaded already, so the
    child needs no access to the interpreter's files."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                read_channel(path)
                message = "read\n"
            except StackError as exc:
                message = f"{exc.code}\n{exc}\n"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out


def test_cv2_is_silenced_for_corrupt_files(tmp_path: Path) -> None:
    """Decode failures come back as one StackError, not as OpenCV's own stderr lines."""
    path = tmp_path / "a.png"
    data = cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes()
    path.write_bytes(data[:40] + data[-12:])
    code = (
        "import sys; from pathlib import Path; from agent.stacks.image import read_channel\n"
        "from agent.stacks.errors import StackError\n"
        "try: read_channel(Path(sys.argv[1]))\n"
        "except StackError as e: print(e.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "corrupt"
    assert "WARN" not in result.stderr
    assert "ERROR" not in result.stderr


# ---------------------------------------------------------------- how the bytes are read


def _samples(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(8)
    gray8 = rng.integers(0, 256, (33, 47)).astype(np.uint8)
    gray16 = rng.integers(0, 4096, (47, 33)).astype(np.uint16)
    paths = [write_png(tmp_path / "g8.png", gray8), write_png(tmp_path / "g16.png", gray16)]
    paths.append(write_png(tmp_path / "rgb.png", np.dstack([gray8, gray8, gray8])))
    tifffile.imwrite(tmp_path / "g16.tif", gray16, photometric="minisblack")
    assert cv2.imwrite(str(tmp_path / "lzw.tif"), gray16)
    return [*paths, tmp_path / "g16.tif", tmp_path / "lzw.tif"]


@pytest.mark.parametrize(("from_fd", "into"), [(True, True), (True, False), (False, True)])
def test_every_way_of_decoding_gives_the_same_pixels_and_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_fd: bool, into: bool
) -> None:
    """From the open file (Linux), into numpy's array or not (OpenCV < 4.10), or from the
    bytes in memory (no /proc): one result, the hash of the bytes on disk."""
    for path in _samples(tmp_path):
        expected = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert expected is not None
        if expected.ndim == 3:
            expected = expected[..., 0]
        monkeypatch.setattr(image, "DECODE_FROM_FD", from_fd)
        monkeypatch.setattr(image, "DECODE_INTO", into)
        channel = read_channel(path)
        np.testing.assert_array_equal(channel.pixels, expected)
        assert channel.pixels.flags.c_contiguous
        assert channel.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_where_proc_fd_names_do_not_open_the_bytes_are_decoded_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_proc(name: str, flags: int, *args: int) -> int:
        if str(name).startswith("/proc/self/fd/"):
            raise PermissionError(13, "hidden by the sandbox")
        return real_open(name, flags, *args)

    monkeypatch.setattr(image, "DECODE_FROM_FD", True)
    monkeypatch.setattr(image, "_fd_names", None)
    monkeypatch.setattr(os, "open", no_proc)
    monkeypatch.setattr(image, "_decode_file", None)  # must not be called
    path = write_png(tmp_path / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    np.testing.assert_array_equal(read_channel(path).pixels, np.arange(64).reshape(8, 8))
    assert image._fd_names is False


def test_a_file_that_changes_while_it_is_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_png(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
    decode = image._decode_file

    def rewritten_meanwhile(name: str, header: image.Header) -> np.ndarray | None:
        pixels = decode(name, header)
        with path.open("ab") as handle:  # a writer appends while the agent decodes
            handle.write(b"more")
        return pixels

    monkeypatch.setattr(image, "_decode_file", rewritten_meanwhile)
    monkeypatch.setattr(image, "DECODE_FROM_FD", True)
    assert _error(path).code == "changed"


def test_a_file_renamed_linked_or_chmodded_while_it_is_read_is_not_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its status change time moves, its content does not: e.g. the agent moving a hard link
    of the same file to done/ while a decode thread reads another."""
    path = write_png(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
    decode = image._decode_file

    def metadata_meanwhile(name: str, header: image.Header) -> np.ndarray | None:
        pixels = decode(name, header)
        os.link(path, tmp_path / "b.png")
        os.rename(tmp_path / "b.png", tmp_path / "c.png")
        path.chmod(0o600)
        return pixels

    monkeypatch.setattr(image, "_decode_file", metadata_meanwhile)
    monkeypatch.setattr(image, "DECODE_FROM_FD", True)
    assert read_channel(path).pixels.shape == (16, 16)


def test_colour_planes_count_against_the_pixel_limit(tmp_path: Path) -> None:
    """Grayscale saved as RGB decodes three planes: it costs, and counts, three times the pixels."""
    gray = np.zeros((100, 100), np.uint8)
    path = write_png(tmp_path / "rgb.png", np.dstack([gray, gray, gray]))
    assert read_channel(path, Limits(max_pixels=30_000)).pixels.shape == (100, 100)
    err = _error(path, Limits(max_pixels=29_999))
    assert err.code == "too_large"
    assert "3 colour planes" in err.message


def test_the_decode_cost_is_known_from_the_header(tmp_path: Path) -> None:
    """Before a pixel is decoded: at least the decoded array, more for a TIFF (its strip buffer)."""
    pixels = np.zeros((300, 200), np.uint16)
    png = write_png(tmp_path / "a.png", pixels)
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, pixels, photometric="minisblack")
    with open_channel(png) as a, open_channel(tif) as b:
        assert a.header.decoded_bytes == b.header.decoded_bytes == 300 * 200 * 2
        assert a.decode_cost() >= a.header.decoded_bytes
        assert b.decode_cost() >= 2 * b.header.decoded_bytes
        assert a.read().pixels.shape == (300, 200)


def test_a_symbolic_link_is_refused_at_the_open_itself(tmp_path: Path) -> None:
    """Not only by a check before opening: a link swapped in after the agent looked is refused too."""
    from agent.stacks.image import _open

    target = tmp_path / "real.png"
    target.write_bytes(b"\x89PNG")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    with pytest.raises(StackError) as refused:
        _open(link)
    assert refused.value.code == "symlink"
