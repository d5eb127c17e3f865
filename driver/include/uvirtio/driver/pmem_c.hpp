// Between the C API (uvirtio/pmem.h) and uvirtio::driver::Pmem: for C code
// inside a C++ program that opened the device itself, and for tests.
#pragma once

#include <memory>

#include "uvirtio/base/result.hpp"
#include "uvirtio/driver/pmem.hpp"
#include "uvirtio/pmem.h"

namespace uvirtio::driver {

// A C handle that owns `pm`; uvirtio_pmem_close() releases both. NULL for a
// null `pm`.
uvirtio_pmem* to_c_handle(std::unique_ptr<Pmem> pm);

// The PmemOptions `opts` asks for (nullptr: the defaults), or
// Errc::invalid_argument naming the bad field.
Result<PmemOptions> pmem_options_from_c(const uvirtio_pmem_options* opts);

}  // namespace uvirtio::driver
