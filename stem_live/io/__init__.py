"""Reading and writing frame streams: every format ``replay``, ``locate``, ``calibrate`` and the
instrument adapters read (our TIFF recordings, ImageJ/plain TIFF, .npy, vendor files through
RosettaSciIO) and the TIFF stacks we record. Results, column lists, PNGs and calibration
reports have their own modules here (:mod:`.results`, :mod:`.columns`, :mod:`.png`, :mod:`.report`)."""

from stem_live.io.frames import count_frames, read_frames, read_images
from stem_live.io.metadata import CONVERTIBLE, FORMAT, MARKER, OPTION_FLAGS, RecordError, sidecar_paths
from stem_live.io.tiff_writer import StackWriter, frame_metadata
from stem_live.io.vendor import VENDOR_FORMATS, count_vendor_frames, is_vendor_file, read_vendor_frames, scan_metadata

__all__ = ["CONVERTIBLE", "FORMAT", "MARKER", "OPTION_FLAGS", "VENDOR_FORMATS", "RecordError", "StackWriter",
           "count_frames", "count_vendor_frames", "frame_metadata", "is_vendor_file", "read_frames", "read_images",
           "read_vendor_frames", "scan_metadata", "sidecar_paths"]
