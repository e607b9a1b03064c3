# isa_expect.sh (sourced by tests): whether oneDNN 2.x can run its bf16 matmul here, from the
# CPU's flags and the cap the test runs under, independently of the binary's own probe, so a
# probe that wrongly says "not available" fails the test instead of being believed.
# oneDNN 2.6's bf16 matmul needs AVX-512 core (F, BW, VL, DQ; bf16 dot products are emulated
# without AVX512-BF16). Sets nm_expect_onednn_bf16 to 1 or 0.
nm_expect_onednn_bf16=0
nm_cpu_flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo)
nm_cpu_flags=" ${nm_cpu_flags%%$'\n'*} "
if [[ $nm_cpu_flags == *" avx512f "* && $nm_cpu_flags == *" avx512bw "* && $nm_cpu_flags == *" avx512vl "* &&
      $nm_cpu_flags == *" avx512dq "* ]]; then
  nm_expect_onednn_bf16=1
fi
case "${ONEDNN_MAX_CPU_ISA:-${DNNL_MAX_CPU_ISA:-ALL}}" in
  SSE41|AVX|AVX2|AVX2_VNNI|sse41|avx|avx2|avx2_vnni) nm_expect_onednn_bf16=0 ;;
esac
