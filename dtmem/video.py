"""Rollout videos: MP4s of the first episodes of a rollout, rendered headless by MuJoCo's
EGL backend and written with imageio-ffmpeg (the `video` extra). The file name says what
was run and how it went: <task>-<cell>-episode<i>-seed<s>-score<x>-tokens<n>.mp4."""

import os
from pathlib import Path

from dtmem.errors import UserError
from dtmem.files import ensure_writable

FRAME_SIZE = 320  # pixels per side: a 1000-step episode renders in a few minutes on a CPU


class VideoRecorder:
    def __init__(self, folder, label, episodes=1, fps=None):
        try:
            import imageio.v2 as imageio  # noqa: F401 (checked before any work)
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UserError('videos need imageio and ffmpeg: pip install "dtmem[video]"') from None
        # Headless rendering: EGL needs no display; must be chosen before the first render.
        os.environ.setdefault("MUJOCO_GL", "egl")
        self.folder, self.label, self.episodes, self.fps = Path(folder), label, episodes, fps
        ensure_writable(self.folder / "video.mp4")
        self.frames = {}  # episode -> [H, W, 3] frames

    def wants(self, episode):
        return episode < self.episodes

    def capture(self, episode, env):
        if self.wants(episode):
            self.frames.setdefault(episode, []).append(env.render())

    def finish(self, episode, result, env):
        """Write the episode's MP4 once its result (score, cache size) is known."""
        if episode not in self.frames:
            return None
        import imageio.v2 as imageio

        fps = self.fps or env.metadata.get("render_fps", 30)
        path = self.folder / (f"{self.label}-episode{episode}-seed{result.seed}-score"
                              f"{result.score:.1f}-tokens{result.mean_tokens:.0f}.mp4")
        self.folder.mkdir(parents=True, exist_ok=True)
        imageio.mimwrite(path, self.frames.pop(episode), fps=fps, macro_block_size=1)
        return path
