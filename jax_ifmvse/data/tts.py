"""eSpeak NG speech synthesis through libespeak-ng's C API (ctypes), shipped by `espeakng-loader`.

libespeak-ng keeps global state (one voice, one set of parameters, one callback), so the library
is initialized once per process and every synthesis holds a module lock.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from jax_ifmvse.errors import IfmvseError

SAMPLE_RATE = 22050  # what libespeak-ng's synthesis callback delivers

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events)
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


# The shipped data names British English plain "en"; accept the common tag too.
_VOICE_ALIASES = {"en-gb": "en"}


class TTSError(IfmvseError, RuntimeError):
    """eSpeak NG could not be loaded or could not synthesize the request."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_chunks: list[np.ndarray] = []


def _on_audio(wav, numsamples, events) -> int:
    # Called from inside espeak_Synth on the calling thread (synchronous mode), under _lock.
    if wav and numsamples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    return 0  # 0 = continue synthesis


_callback = _CALLBACK(_on_audio)  # module-level so the C side never sees a collected pointer


def _load() -> ctypes.CDLL:
    """Load and initialize libespeak-ng once (caller holds _lock)."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise TTSError(f"espeakng-loader is not installed: {e}") from None
    lib_path = espeakng_loader.get_library_path()
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as e:
        raise TTSError(f"{lib_path}: cannot load libespeak-ng: {e}") from None
    data = Path(espeakng_loader.get_data_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    # The C side accepts the folder holding espeak-ng-data.
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data.parent).encode(), _INITIALIZE_DONT_EXIT
    )
    if rate != SAMPLE_RATE:
        raise TTSError(f"{data}: espeak_Initialize returned {rate}, expected {SAMPLE_RATE} Hz")
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetSynthCallback(_callback)
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    _lib = lib
    return lib


def synthesize(
    text: str,
    *,
    voice: str = "en-us",
    pitch: int = 50,
    pitch_range: int = 50,
    rate: int = 175,
    volume: int = 100,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Speak `text` with eSpeak NG; returns (int16 mono samples, 22050).

    eSpeak's pitch flutter keeps a phase across calls in one process (a static inside
    libespeak-ng that no API resets), so repeated calls differ slightly; `seed` fixes the
    breath noise of breathy variants.
    """
    if not text.strip():
        raise TTSError("cannot synthesize empty text")
    checks = {
        "pitch": (pitch, 0, 100),
        "pitch_range": (pitch_range, 0, 100),
        "rate": (rate, 80, 450),
        "volume": (volume, 0, 200),
    }
    for name, (v, lo, hi) in checks.items():
        if not lo <= v <= hi:
            raise TTSError(f"{name}={v} is outside eSpeak NG's range {lo}..{hi}")
    buf = text.encode("utf-8") + b"\0"
    with _lock:
        lib = _load()
        base, _, variant = voice.partition("+")
        name = _VOICE_ALIASES.get(base.lower(), base) + ("+" + variant if variant else "")
        if lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise TTSError(f"unknown eSpeak NG voice {voice!r}")
        for param, value in (
            (_RATE, rate),
            (_VOLUME, volume),
            (_PITCH, pitch),
            (_RANGE, pitch_range),
        ):
            lib.espeak_SetParameter(param, int(value), 0)
        # Breathy variants (e.g. +f3) add noise from eSpeak's own generator; seed it per call.
        lib.espeak_ng_SetRandSeed(int(seed))
        _chunks.clear()
        err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            _chunks.clear()
            raise TTSError(f"espeak_Synth failed with code {err} for voice {voice!r}")
        lib.espeak_Synchronize()
        wav = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
        _chunks.clear()
    return wav.astype(np.int16, copy=False), SAMPLE_RATE
