# Every kind of x86-64 on any machine: the tests that walk a user's path (no kernel override)
# run again with oneDNN capped at AVX2 (an AVX2-only CPU: Zen 2/3, Haswell to Comet Lake, where
# oneDNN 2.6 has no bf16 matmul) and at AVX512_CORE (AVX-512 without bf16 dot products).
# oneDNN 2.x reads DNNL_MAX_CPU_ISA, 3.x ONEDNN_MAX_CPU_ISA: both are set. A cap above what the
# CPU has changes nothing, so on an AVX2-only machine the AVX512_CORE variant runs natively.
foreach(isa AVX2 AVX512_CORE)
  string(TOLOWER ${isa} isa_lower)
  set(isa_env "ONEDNN_MAX_CPU_ISA=${isa};DNNL_MAX_CPU_ISA=${isa}")
  foreach(script kernel_choice kernel_env user_path)
    add_test(NAME test_${script}_${isa_lower} COMMAND bash ${CMAKE_SOURCE_DIR}/tests/test_${script}.sh
             WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
    set_tests_properties(test_${script}_${isa_lower} PROPERTIES LABELS "cpu;e2e;isa" SKIP_RETURN_CODE 77
                         ENVIRONMENT "${NM_TEST_ENV};${isa_env}")
  endforeach()
endforeach()
