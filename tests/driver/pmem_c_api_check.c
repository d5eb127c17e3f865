/* Compiles the public C header as strict C99: the build fails if uvirtio/pmem.h
 * stops being valid C. The functions are never called. */
#include "uvirtio/pmem.h"

static void uvirtio_pmem_c_api_done(int result, const char *message, void *ctx) {
  (void)result;
  (void)message;
  (void)ctx;
}

int uvirtio_pmem_c_api_check(uvirtio_pmem *pm);
int uvirtio_pmem_c_api_check(uvirtio_pmem *pm) {
  char buf[8] = "c";
  uvirtio_pmem_stats st;
  if (uvirtio_pmem_size(pm) == 0) return -1;
  uvirtio_pmem_drain();
  if (uvirtio_pmem_recover(pm) < 0) return -1;
  if (uvirtio_pmem_repersist(pm, uvirtio_pmem_data(pm), 1) != 0) return -1;
  if (uvirtio_pmem_persist_async(pm, uvirtio_pmem_data(pm), 1, uvirtio_pmem_c_api_done, buf) != 0) return -1;
  uvirtio_pmem_get_stats(pm, &st);
  return uvirtio_pmem_memcpy_persist(pm, uvirtio_pmem_data(pm), buf, sizeof buf) + (int)st.recoveries;
}

int uvirtio_pmem_c_api_open_check(const char *bdf, uvirtio_pmem **out);
int uvirtio_pmem_c_api_open_check(const char *bdf, uvirtio_pmem **out) {
  uvirtio_pmem_options o;
  char err[128];
  uvirtio_pmem_options_init(&o);
  o.completion = UVIRTIO_PMEM_POLL;
  o.recover_on_reset = 1;
  return uvirtio_pmem_open_opts(bdf, &o, out, err, sizeof err);
}
