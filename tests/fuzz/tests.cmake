# tests/fuzz/tests.cmake: one libFuzzer target per parser of outside input (issue 11), included
# by the top-level CMakeLists.txt. The project is built with the default C compiler; libFuzzer
# needs clang, so each target is compiled by a custom command straight from the few sources it
# needs. Without clang (or without its libFuzzer runtime) the tests are still registered and
# report themselves skipped (exit 77; under CI=true a failure).
find_program(NM_CLANG NAMES clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14)
set(NM_FUZZ_OK OFF)
# A fixable skip (tests/skip.sh): a failure under CI=true.
set(NM_FUZZ_MISSING "clang with libFuzzer not found (apt-get install clang)")
if(NM_CLANG)
  # Probe once that clang links -fsanitize=fuzzer (the runtime is a separate package on some systems).
  set(_probe ${CMAKE_BINARY_DIR}/CMakeFiles/nm_fuzz_probe.c)
  file(WRITE ${_probe} "#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n")
  execute_process(COMMAND ${NM_CLANG} -fsanitize=fuzzer,address ${_probe} -o ${CMAKE_BINARY_DIR}/CMakeFiles/nm_fuzz_probe
                  RESULT_VARIABLE _rc OUTPUT_QUIET ERROR_QUIET)
  if(_rc EQUAL 0)
    set(NM_FUZZ_OK ON)
  endif()
endif()

# The targets' shared fixtures (headers of src/ are not tracked here: a changed one needs a
# touched source or a clean build of the fuzz targets).
file(GLOB NM_FUZZ_HEADERS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/fuzz/*.h)

# nm_fuzz_build(NAME SOURCES...): build/fuzz_NAME from tests/fuzz/fuzz_NAME.c and SOURCES
# (paths under the source root), with clang -fsanitize=fuzzer,address,undefined.
function(nm_fuzz_build name)
  set(_srcs ${CMAKE_SOURCE_DIR}/tests/fuzz/fuzz_${name}.c ${CMAKE_SOURCE_DIR}/src/core/check.c
            ${CMAKE_SOURCE_DIR}/src/core/fileio.c ${CMAKE_SOURCE_DIR}/src/core/strdist.c
            ${CMAKE_SOURCE_DIR}/src/core/parallel.c)
  foreach(s ${ARGN})
    list(APPEND _srcs ${CMAKE_SOURCE_DIR}/${s})
  endforeach()
  add_custom_command(
    OUTPUT ${CMAKE_BINARY_DIR}/fuzz_${name}
    COMMAND ${NM_CLANG} -std=c11 -D_POSIX_C_SOURCE=200809L -O1 -g -fno-omit-frame-pointer
            -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wall -Wextra -Werror
            -Wno-unused-parameter -I${CMAKE_SOURCE_DIR}/src ${_srcs} -lcjson -lpcre2-8 -lm -lpthread -o ${CMAKE_BINARY_DIR}/fuzz_${name}
    DEPENDS ${_srcs} ${NM_FUZZ_HEADERS}
    COMMENT "Building libFuzzer target fuzz_${name} with clang"
    VERBATIM)
  add_custom_target(fuzz_${name}_target ALL DEPENDS ${CMAKE_BINARY_DIR}/fuzz_${name})
endfunction()

# name | runs | the longest input | sources besides the target. Each runs a short fixed budget
# here (run_fuzz_target.sh); long runs: see tests/fuzz/README.md.
set(NM_FUZZ_PARSERS indexed model_config train_config safetensors tokenizer trainer_json hf_index quant_config
    fp8_block kernels_json pipeline_layout)
set(NM_FUZZ_RUNS_indexed 20000)
set(NM_FUZZ_MAXLEN_indexed 512)
set(NM_FUZZ_SRC_indexed src/data/indexed.c)
set(NM_FUZZ_SRC_model_config src/model/config.c)
set(NM_FUZZ_SRC_train_config src/train/train_config.c src/train/schedule.c src/train/optim.c src/model/config.c
    src/io/hf_dir.c src/io/safetensors.c src/model/params.c src/core/rng.c src/ops/fp8_decode.c src/ops/backend_names.c
    src/comm/comm.c)
# The seeds include data.paths lists of 1000 and 5000 entries (the latter 165 kB; libFuzzer cuts a
# seed to max_len, which would leave only broken JSON of the long lists).
set(NM_FUZZ_MAXLEN_train_config 262144)
set(NM_FUZZ_SRC_safetensors src/io/safetensors.c)
set(NM_FUZZ_SRC_tokenizer src/data/tokenizer.c src/data/tokenizer_util.c)
set(NM_FUZZ_SRC_trainer_json src/train/checkpoint.c src/io/table_io.c src/io/safetensors.c src/model/params.c src/core/rng.c
    src/model/config.c src/train/train_config.c src/train/schedule.c src/train/optim.c src/io/hf_dir.c src/comm/comm.c src/ops/fp8_decode.c src/ops/backend_names.c)
# A Hugging Face model directory as hf_dir.c loads it (fixtures in tests/fuzz/fuzz_hf.h).
set(NM_FUZZ_HF_DIR src/io/hf_dir.c src/io/safetensors.c src/model/params.c src/model/config.c src/core/rng.c
    src/ops/fp8_decode.c)
set(NM_FUZZ_SRC_hf_index ${NM_FUZZ_HF_DIR})
set(NM_FUZZ_SRC_quant_config ${NM_FUZZ_HF_DIR})
set(NM_FUZZ_SRC_fp8_block ${NM_FUZZ_HF_DIR})
set(NM_FUZZ_SRC_kernels_json src/ops/cpu/tuning_parse.c)
set(NM_FUZZ_SRC_pipeline_layout src/train/pipeline_layout.c)
set(NM_FUZZ_MAXLEN_pipeline_layout 512)
set(NM_FUZZ_RUNS_pipeline_layout 50000)  # a small parser: 50,000 runs take about a second
foreach(t ${NM_FUZZ_PARSERS})
  if(NM_FUZZ_OK)
    nm_fuzz_build(${t} ${NM_FUZZ_SRC_${t}})
    if(NOT DEFINED NM_FUZZ_RUNS_${t})
      set(NM_FUZZ_RUNS_${t} 5000)
    endif()
    if(NOT DEFINED NM_FUZZ_MAXLEN_${t})
      set(NM_FUZZ_MAXLEN_${t} 16384)
    endif()
    add_test(NAME fuzz_${t} COMMAND bash ${CMAKE_SOURCE_DIR}/tests/fuzz/run_fuzz_target.sh ${CMAKE_BINARY_DIR}/fuzz_${t}
             ${t} ${CMAKE_SOURCE_DIR} ${NM_FUZZ_RUNS_${t}} ${NM_FUZZ_MAXLEN_${t}} WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  else()
    add_test(NAME fuzz_${t} COMMAND bash ${CMAKE_SOURCE_DIR}/tests/skip.sh "fuzz_${t}: ${NM_FUZZ_MISSING}")
  endif()
  set_tests_properties(fuzz_${t} PROPERTIES LABELS "cpu;fuzz" SKIP_RETURN_CODE 77)
endforeach()

# The runner itself: a target with planted bugs must fail it (exit 1), never pass or skip.
if(NM_FUZZ_OK)
  nm_fuzz_build(planted)
  add_test(NAME fuzz_runner_reports_findings COMMAND bash ${CMAKE_SOURCE_DIR}/tests/fuzz/check_runner.sh
           ${CMAKE_BINARY_DIR}/fuzz_planted ${CMAKE_SOURCE_DIR} WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
else()
  add_test(NAME fuzz_runner_reports_findings COMMAND bash ${CMAKE_SOURCE_DIR}/tests/skip.sh
           "fuzz_runner_reports_findings: ${NM_FUZZ_MISSING}")
endif()
set_tests_properties(fuzz_runner_reports_findings PROPERTIES LABELS "cpu;fuzz" SKIP_RETURN_CODE 77)
message(STATUS "nano-megatron: fuzz targets ${NM_FUZZ_OK} (clang: ${NM_CLANG})")
