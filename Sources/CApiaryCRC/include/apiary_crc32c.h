#ifndef APIARY_CRC32C_H
#define APIARY_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

/// Whether this CPU has a CRC-32C instruction (x86-64 SSE4.2, or ARMv8 CRC).
bool apiary_crc32c_hardware_available(void);

/// CRC-32C of `count` bytes continuing from `crc` (pre-inverted state, as the table
/// version keeps it). MUST only be called when apiary_crc32c_hardware_available().
uint32_t apiary_crc32c_hardware_update(uint32_t crc, const uint8_t *bytes, size_t count);

#endif
