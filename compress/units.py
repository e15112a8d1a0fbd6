"""Sizes for people: exact bytes with thousands separators, plus IEC units (KiB, MiB, GiB; never "MB").

    >>> format_bytes(1234567)
    '1,234,567 B (1.18 MiB)'
    >>> format_iec(1536)
    '1.50 KiB'
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_iec(n: float) -> str:
    """`n` bytes in the largest IEC unit that keeps the number >= 1 ("512 B", "1.50 KiB", "-2.00 MiB")."""
    sign = "-" if n < 0 else ""
    value = abs(float(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    unit = _UNITS[0]
    for unit in _UNITS:
        value /= 1024
        if round(value, 2) < 1024:
            break
    return f"{sign}{value:.2f} {unit}"


def format_bytes(n: int) -> str:
    """Exact bytes with separators, and the IEC size in parentheses when it is 1 KiB or more.

    >>> format_bytes(512), format_bytes(90_868_376)
    ('512 B', '90,868,376 B (86.66 MiB)')
    """
    exact = f"{int(n):,} B"
    return exact if abs(n) < 1024 else f"{exact} ({format_iec(n)})"
