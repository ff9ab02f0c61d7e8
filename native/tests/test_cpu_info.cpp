// The ISA limit must lower, never raise, what the dispatcher picks.
#include "check.h"
#include "sparsellm/cpu_info.h"

using namespace sparsellm;

int main() {
  const CpuInfo& info = cpu_info();
  CHECK(!info.brand.empty(), "brand string empty");
  Isa best = active_isa();
  CHECK(!(best == Isa::Avx512 && !info.avx512), "avx512 chosen but not detected");
  set_isa_limit(Isa::Portable);
  CHECK(active_isa() == Isa::Portable, "limit to portable ignored");
  set_isa_limit(Isa::Avx512);
  CHECK(active_isa() == best, "raising the limit back did not restore %s", isa_name(best));
  set_num_threads(1);
  CHECK(num_threads() == 1, "set_num_threads(1) gave %d", num_threads());
  return check::finish("test_cpu_info");
}
