"""C3AE age estimation (Zhang et al., CVPR 2019) across its whole life cycle on Ray."""

import os
from importlib.metadata import PackageNotFoundError, version

# A file that is not a video is an error row or line of ours; OpenCV and its FFmpeg would also print their own
# warnings for it ("moov atom not found") on every such file. Set before OpenCV loads; a user's setting wins.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

try:
    __version__ = version("c3ae-ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
