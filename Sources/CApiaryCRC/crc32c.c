// The CPU's CRC-32C instruction, which Swift cannot reach directly. About 5x faster than the
// slicing-by-8 table on records of a few pages, and the CRC sits on every commit's path
// twice (the primary's log frame, the standby's).
#include "apiary_crc32c.h"
#include <string.h>

#if defined(__x86_64__)

bool apiary_crc32c_hardware_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}

__attribute__((target("sse4.2")))
uint32_t apiary_crc32c_hardware_update(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n > 0) {
        c32 = __builtin_ia32_crc32qi(c32, *p);
        p++;
        n--;
    }
    return c32;
}

#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>

bool apiary_crc32c_hardware_available(void) { return true; }

uint32_t apiary_crc32c_hardware_update(uint32_t crc, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = __crc32cd(crc, word);
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        crc = __crc32cb(crc, *p);
        p++;
        n--;
    }
    return crc;
}

#else

bool apiary_crc32c_hardware_available(void) { return false; }

uint32_t apiary_crc32c_hardware_update(uint32_t crc, const uint8_t *p, size_t n) {
    (void)p; (void)n;
    return crc;
}

#endif
