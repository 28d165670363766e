"""inference.py on videos: frames, timestamps and orientation kept, the photo path's masks, cut-off
files, interrupts, mixed folders, bounded memory; and ``--save confidence``.

The videos are generated here with PyAV: 64x48 at 25 fps, a second or two.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import threading
import tracemalloc
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dataloader.video
import deploy.outputs
import deploy.video_writer
from inference_testing import read_mask, run, write_image
from modeling.checkpoint import load_model

WIDTH, HEIGHT = 64, 48


def blobs(seed: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A smooth random ``(H, W, 3)`` uint8 picture (regions the model can tell apart)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def write_video(path: Path, frames: int = 25, *, pts: list[int] | None = None,
                time_base: Fraction = Fraction(1, 25), rotation: int = 0,
                pictures=None, options: dict | None = None, audio: bool = False) -> Path:
    """An H.264 MP4 of ``frames`` frames at ``pts`` (default one per tick of ``time_base``),
    with a display matrix turning it ``rotation`` degrees counter-clockwise."""
    pts = pts if pts is not None else list(range(frames))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=8000) if audio else None
        for index, stamp in enumerate(pts):
            picture = pictures(index) if pictures else blobs(index // 5)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = stamp, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="flt",
                                                 layout="mono")
            samples.sample_rate, samples.pts = 8000, 0
            container.mux(sound.encode(samples))
            container.mux(sound.encode(None))
    return path


def frame_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [float(frame.time) for frame in container.decode(video=0)]


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def masks(folder: Path) -> list[np.ndarray]:
    return [read_mask(path) for path in sorted(folder.iterdir())]


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_video_keeps_its_frames_timestamps_and_size(ckpt, tmp_path, capsys):
    clip = write_video(tmp_path / "in" / "clip.mp4", frames=40)
    out = tmp_path / "out"
    assert run(ckpt, clip, out, "--save", "mask,overlay,color,confidence",
               "--batch-size", "3") == 0
    confidence = sorted((out / "clip_confidence").iterdir())
    assert len(confidence) == 40 and Image.open(confidence[0]).mode == "L"
    assert frame_times(out / "clip_overlay.mp4") == frame_times(clip)  # 40 frames, 1.6 s
    assert frame_times(out / "clip_color.mp4") == frame_times(clip)
    found = masks(out / "clip")
    assert [path.name for path in sorted((out / "clip").iterdir())][:2] == ["000000.png",
                                                                             "000001.png"]
    assert len(found) == 40 and all(mask.shape == (HEIGHT, WIDTH) for mask in found)
    with av.open(str(out / "clip_overlay.mp4")) as video:
        assert video.metadata["comment"] == deploy.outputs.MARKER
    # The outputs are this tool's: a second run asks, --skip-existing keeps, --overwrite redoes.
    save = ["--save", "mask,overlay,color,confidence"]
    assert run(ckpt, clip, out, *save) == 2
    assert run(ckpt, clip, out, *save, "--skip-existing") == 0
    assert "1 skipped" in capsys.readouterr().out
    assert run(ckpt, clip, out, *save, "--overwrite") == 0
    assert len(masks(out / "clip")) == 40
    assert sorted(os.listdir(out)) == ["clip", "clip_color.mp4", "clip_confidence",
                                       "clip_overlay.mp4"]  # no temporary left
    # Anything this tool did not write is never replaced, whatever the flags.
    (out / "clip" / "notes.txt").write_text("mine")
    assert run(ckpt, clip, out, *save, "--overwrite") == 2
    assert (out / "clip" / "notes.txt").read_text() == "mine"


def test_a_variable_frame_rate_keeps_its_timestamps(ckpt, tmp_path):
    stamps = [0, 40, 80, 200, 240, 500, 520, 1000, 1033, 1500]  # milliseconds
    clip = write_video(tmp_path / "vfr.mp4", pts=stamps, time_base=Fraction(1, 1000))
    assert run(ckpt, clip, tmp_path / "out", "--save", "overlay") == 0
    times = frame_times(tmp_path / "out" / "vfr_overlay.mp4")
    assert times == pytest.approx([stamp / 1000 for stamp in stamps], abs=1e-3)


@pytest.mark.parametrize("rotation,red_at", [(90, "bottom"), (-90, "top"), (180, "right")])
def test_a_phone_video_is_turned_as_players_show_it(ckpt, tmp_path, rotation, red_at):
    """Stored landscape, left half red: a display matrix turning it 90 degrees
    counter-clockwise shows the red half at the bottom of a portrait picture."""
    def halves(index):
        picture = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        picture[:, :WIDTH // 2, 0] = 255
        picture[:, WIDTH // 2:, 2] = 255
        return picture

    clip = write_video(tmp_path / "phone.mp4", frames=5, rotation=rotation, pictures=halves)
    out = tmp_path / "out"
    assert run(ckpt, clip, out, "--save", "mask,overlay", "--alpha", "0") == 0
    shown = (WIDTH, HEIGHT) if rotation % 180 else (HEIGHT, WIDTH)
    assert all(mask.shape == shown for mask in masks(out / "phone"))
    with av.open(str(out / "phone_overlay.mp4")) as video:
        frames = list(video.decode(video=0))
    assert len(frames) == 5 and all(frame.rotation == 0 for frame in frames)
    red = frames[0].to_ndarray(format="rgb24")[..., 0].astype(float)
    half = {"top": red[:red.shape[0] // 2], "bottom": red[red.shape[0] // 2:],
            "right": red[:, red.shape[1] // 2:]}[red_at]
    assert half.mean() > 200 and red.mean() < 150  # the red half there, the blue one elsewhere


def test_frames_get_the_masks_of_the_same_frames_as_photos(ckpt, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", frames=30)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, picture in enumerate(decoded(clip)):
        Image.fromarray(picture).save(photos / f"{index:06d}.png")
    assert run(ckpt, clip, tmp_path / "video_out", "--batch-size", "4") == 0
    assert run(ckpt, photos, tmp_path / "photo_out") == 0
    from_video = np.stack(masks(tmp_path / "video_out" / "clip"))
    from_photos = np.stack([read_mask(tmp_path / "photo_out" / f"{index:06d}.png")
                            for index in range(30)])
    assert len(np.unique(from_photos)) > 1  # the frames have regions, not one class
    assert (from_video == from_photos).mean() >= 0.999


def test_a_cut_off_video_keeps_its_frames_and_the_run_goes_on(ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    # The index first (as streaming MP4s have it), so what is left of the file says how
    # many frames there were and the ones before the cut still decode.
    cut = write_video(folder / "a_cut.mp4", frames=50, options={"movflags": "faststart"})
    whole = write_video(folder / "b_whole.mp4", frames=25)
    with open(cut, "r+b") as handle:
        handle.truncate(cut.stat().st_size // 2)
    out = tmp_path / "out"
    assert run(ckpt, folder, out, "--save", "mask,overlay") == 1
    lines = errors(capsys)
    assert len(lines) == 1 and "a_cut.mp4" in lines[0], lines
    kept = frame_times(out / "a_cut_overlay.mp4")  # plays
    assert 0 < len(kept) < 50 and len(masks(out / "a_cut")) == len(kept)
    assert frame_times(out / "b_whole_overlay.mp4") == frame_times(whole)


def test_a_video_that_does_not_open_is_one_line(ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "a.mp4").parent.mkdir()
    (folder / "a.mp4").write_bytes(b"not a video at all")
    write_image(folder / "b.png", 32, 24)
    assert run(ckpt, folder, tmp_path / "out") == 1
    lines = errors(capsys)
    assert len(lines) == 1 and "a.mp4" in lines[0]
    assert (tmp_path / "out" / "b.png").is_file() and not (tmp_path / "out" / "a").exists()


def test_sigterm_leaves_a_playable_partial_video(ckpt, tmp_path, monkeypatch, capsys):
    clip = write_video(tmp_path / "clip.mp4", frames=40)
    real = deploy.video_writer.frame_samples

    def signalled_after_20(*args, **kwargs):
        for sample in real(*args, **kwargs):
            if sample["index"] == 20:
                os.kill(os.getpid(), signal.SIGTERM)
            yield sample

    monkeypatch.setattr(deploy.video_writer, "frame_samples", signalled_after_20)
    out = tmp_path / "out"
    assert run(ckpt, clip, out, "--save", "mask,overlay") == 143
    assert "clip_overlay.partial.mp4" in capsys.readouterr().err
    kept = frame_times(out / "clip_overlay.partial.mp4")
    assert 15 <= len(kept) <= 21 and kept == frame_times(clip)[:len(kept)]
    assert not (out / "clip_overlay.mp4").exists()
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    monkeypatch.setattr(deploy.video_writer, "frame_samples", real)
    assert run(ckpt, clip, out, "--save", "mask,overlay", "--skip-existing") == 0
    assert len(frame_times(out / "clip_overlay.mp4")) == 40


def test_a_folder_mixing_photos_and_videos(ckpt, tmp_path, capsys):
    folder = tmp_path / "in"
    write_image(folder / "photo.jpg", 40, 30)
    write_video(folder / "sub" / "clip.mp4", frames=10, audio=True)
    out = tmp_path / "out"
    assert run(ckpt, folder, out, "--save", "mask") == 0
    captured = capsys.readouterr()
    assert "2 inputs segmented" in captured.out
    assert [line for line in captured.err.splitlines() if "audio" in line] == [
        f"note: {folder / 'sub' / 'clip.mp4'}: its audio is not copied to the outputs"]
    assert read_mask(out / "photo.png").shape == (30, 40)
    assert len(masks(out / "sub" / "clip")) == 10


def test_confidence_is_the_rounded_softmax_probability_of_the_class(ckpt, tmp_path):
    photo = write_image(tmp_path / "in" / "a.png", 40, 30, seed=4)
    assert run(ckpt, photo, tmp_path / "out", "--save", "mask,confidence") == 0
    with Image.open(tmp_path / "out" / "a_confidence.png") as saved:
        assert saved.mode == "L" and saved.info["Software"] == deploy.outputs.MARKER
        confidence = np.asarray(saved).astype(int)
    model, settings = load_model(ckpt)
    pixels = torch.from_numpy(np.array(Image.open(photo).convert("RGB"))).permute(2, 0, 1)
    mean = torch.tensor(settings["mean"]).view(3, 1, 1)
    std = torch.tensor(settings["std"]).view(3, 1, 1)
    with torch.no_grad():
        logits = model(((pixels / 255.0 - mean) / std)[None])["out"]
        logits = F.interpolate(logits, size=(30, 40), mode="bilinear", align_corners=False)
    scaled = logits.double().softmax(dim=1).max(dim=1).values[0].numpy() * 255
    expected = np.rint(scaled).astype(int)
    differs = confidence != expected
    assert np.abs(confidence - expected).max() <= 1 and differs.mean() <= 0.001
    assert (np.abs(scaled[differs] - np.floor(scaled[differs]) - 0.5) < 1e-2).all()
    assert confidence.min() < 255  # a random model is unsure somewhere


def peak_python_memory(ckpt: Path, clip: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        assert run(ckpt, clip, out, "--save", "mask,overlay", "--batch-size", "2") == 0
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_length_of_the_video(ckpt, tmp_path):
    short = write_video(tmp_path / "short.mp4", frames=50)
    long = write_video(tmp_path / "long.mp4", frames=200)
    peak_python_memory(ckpt, short, tmp_path / "warm-up")  # imports and caches, once
    shutil.rmtree(tmp_path / "warm-up")
    short_peak = peak_python_memory(ckpt, short, tmp_path / "short")
    long_peak = peak_python_memory(ckpt, long, tmp_path / "long")
    # Holding the clip would add 150 frames x (9 kB of pixels + 3 kB of ids) = 1.8 MB.
    assert long_peak - short_peak < 150 * WIDTH * HEIGHT * 4 / 4, (short_peak, long_peak)


def test_frames_stream_through_a_few_at_a_time(ckpt, tmp_path, monkeypatch):
    """Python's allocator does not see FFmpeg's or torch's buffers: count the decoded frames
    alive at once instead. A run that held the clip would hold all 200."""
    real = dataloader.video.video_frames
    alive: set[int] = set()
    most = [0]

    def counted(*args, **kwargs):
        for frame in real(*args, **kwargs):
            alive.add(frame.index)
            weakref.finalize(frame.pixels, alive.discard, frame.index)
            most[0] = max(most[0], len(alive))
            yield frame

    monkeypatch.setattr(dataloader.video, "video_frames", counted)
    clip = write_video(tmp_path / "long.mp4", frames=200)
    assert run(ckpt, clip, tmp_path / "out", "--save", "mask,overlay", "--batch-size", "2") == 0
    assert len(masks(tmp_path / "out" / "long")) == 200
    assert 2 <= most[0] <= 3 * 2 + 2  # a batch formed, one waiting, one being decoded


def test_a_video_this_tool_did_not_write_is_never_replaced(ckpt, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", frames=5)
    out = tmp_path / "out"
    foreign = write_video(out / "clip_overlay.mp4", frames=3)  # somebody's video, unmarked
    before = foreign.read_bytes()
    for flag in ("--overwrite", "--skip-existing"):
        assert run(ckpt, clip, out, "--save", "overlay", flag) == 2
        assert "did not write" in errors(capsys)[0]
    assert foreign.read_bytes() == before


def test_read_ahead_keeps_order_raises_where_the_error_was_and_stops_its_thread():
    def items():
        yield from range(5)
        raise ValueError("damaged")

    got = []
    with pytest.raises(ValueError, match="damaged"):
        with dataloader.video.read_ahead(items(), 2) as ahead:
            got.extend(ahead)
    assert got == [0, 1, 2, 3, 4]

    closed = []

    def endless():
        try:
            yield from itertools.count()
        finally:  # closed by the thread that decodes, before the container would be
            closed.append(threading.current_thread().name)

    with dataloader.video.read_ahead(endless(), 2) as ahead:
        assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    assert closed == ["read-ahead"]
    assert "read-ahead" not in [thread.name for thread in threading.enumerate()]


def test_writes_behind_the_model_keep_their_order_and_their_errors():
    written = []

    def write(sample, labels):
        if sample["index"] == 7:
            raise OSError("disk full")
        written.append((sample["index"], threading.current_thread().name))

    with deploy.video_writer.InOrder(write) as behind:
        for index in range(5):
            behind.add({"index": index}, None)
    assert [index for index, _ in written] == [0, 1, 2, 3, 4]
    assert {name for _, name in written} != {threading.current_thread().name}
    with pytest.raises(OSError, match="disk full"):
        with deploy.video_writer.InOrder(write) as behind:
            for index in range(6, 9):
                behind.add({"index": index}, None)
    # 6 was written; 7 failed; 8 was given before the error surfaced, and runs or is cancelled
    assert [index for index, _ in written][5:] in ([6], [6, 8])
