// OpenBLAS picks its kernels when it loads, before main(). Debian 12's OpenBLAS (0.3.21) does
// not know AMD Zen 4 and runs its AVX2 ("Haswell") kernels there at half the speed its AVX-512
// ("SkylakeX") kernels reach on the same cores. It honours OPENBLAS_CORETYPE, read at load time:
// a program that wants the fast kernels re-executes itself with the variable set.
#pragma once

namespace segany {

// If OpenBLAS runs AVX2 kernels on a CPU with AVX-512 (F, BW, DQ, VL) and OPENBLAS_CORETYPE is
// unset, sets it to SkylakeX and re-executes this program with the same arguments (never returns
// then). Otherwise, or if re-executing fails, returns and changes nothing.
void use_fastest_openblas_kernels(char** argv);

}  // namespace segany
