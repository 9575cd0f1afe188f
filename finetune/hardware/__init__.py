"""Hardware facts: `detect()` this machine, or `profile_by_name()` a simulated one."""

from finetune.hardware.detect import detect, profile_from_device_properties
from finetune.hardware.profile import OPTIONAL_PACKAGES, DeviceProperties, HardwareProfile
from finetune.hardware.simulated import PROFILE_NAMES, profile_by_name

__all__ = [
    "OPTIONAL_PACKAGES",
    "PROFILE_NAMES",
    "DeviceProperties",
    "HardwareProfile",
    "detect",
    "profile_by_name",
    "profile_from_device_properties",
]
