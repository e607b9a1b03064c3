# tests/ops/tests.cmake: the op oracle driver used by tests/reference/test_ops_torch.py
# (included by the top-level CMakeLists.txt). It lands in the build directory, where the
# Python test finds it through NM_BUILD.
add_executable(nm_ops_oracle ${CMAKE_CURRENT_LIST_DIR}/ops_oracle.c)
target_link_libraries(nm_ops_oracle PRIVATE nanomegatron_lib)
set_target_properties(nm_ops_oracle PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
