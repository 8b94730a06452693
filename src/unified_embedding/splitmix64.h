/* SplitMix64's finaliser and constants, shared by the C extensions: the same mixer as
 * `unified_embedding.hashing` (a bijection on 64-bit words with full avalanche). */
#ifndef UNIFIED_EMBEDDING_SPLITMIX64_H
#define UNIFIED_EMBEDDING_SPLITMIX64_H

#include <stdint.h>

static const uint64_t SPLITMIX_M1 = 0xBF58476D1CE4E5B9ULL;
static const uint64_t SPLITMIX_M2 = 0x94D049BB133111EBULL;
static const uint64_t SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15ULL;

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= SPLITMIX_M1;
    x ^= x >> 27;
    x *= SPLITMIX_M2;
    x ^= x >> 31;
    return x;
}

#endif
