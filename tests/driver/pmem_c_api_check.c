/* Compiles the public C header as strict C99: the build fails if uvirtio/pmem.h
 * stops being valid C. The function is never called. */
#include "uvirtio/pmem.h"

int uvirtio_pmem_c_api_check(uvirtio_pmem *pm);
int uvirtio_pmem_c_api_check(uvirtio_pmem *pm) {
  char buf[8] = "c";
  if (uvirtio_pmem_size(pm) == 0) return -1;
  uvirtio_pmem_drain();
  if (uvirtio_pmem_recover(pm) < 0) return -1;
  if (uvirtio_pmem_repersist(pm, uvirtio_pmem_data(pm), 1) != 0) return -1;
  return uvirtio_pmem_memcpy_persist(pm, uvirtio_pmem_data(pm), buf, sizeof buf);
}
