// The neuron-major pass of the Hybrid FFN backward (train_hybrid.h) compiled for AVX2; called only
// when the CPU has it.
#include "train_hybrid.h"

namespace sparsellm {

int hybrid_neuron_pass_avx2(const HybridNeuronPass& a, int nthreads) { return hybrid_neuron_pass_impl(a, nthreads); }

}  // namespace sparsellm
