/**
 * @file abi_check.cu
 * @brief Compile-only check that host/abi.py mirrors abi.cuh exactly.
 *
 * The test defines FMOE_OFF_<Struct>_<field>, FMOE_SIZE_<Struct> and
 * FMOE_ENUM_<Enum>_<name> from the Python mirror; every field listed in
 * FMOE_ABI_FIELDS must have a matching offset, every enumerator in FMOE_ABI_ENUMS a
 * matching value.
 */
#include <flashmoe/abi.cuh>


using namespace flashmoe::abi;

#define FMOE_CHECK_FIELD(S, F)                                       \
  static_assert(__builtin_offsetof(S, F) == FMOE_OFF_##S##_##F,                \
                "host/abi.py: offset of " #S "." #F " differs from abi.cuh");
#define FMOE_CHECK_SIZE(S) \
  static_assert(sizeof(S) == FMOE_SIZE_##S, "host/abi.py: sizeof(" #S ") differs from abi.cuh");

#define FMOE_CHECK_ENUM(E, N)                                                     \
  static_assert(static_cast<long long>(N) == FMOE_ENUM_##E##_##N,                 \
                "host/abi.py: " #E "::" #N " differs from abi.cuh");

FMOE_ABI_FIELDS(FMOE_CHECK_FIELD)
FMOE_ABI_STRUCTS(FMOE_CHECK_SIZE)
FMOE_ABI_ENUMS(FMOE_CHECK_ENUM)
static_assert(kAbiVersion == FMOE_ABI_VERSION, "host/abi.py: ABI version differs from abi.cuh");

extern "C" __global__ void flashmoe_abi_check() {}
