# The zero-allocation test needs the allocator wrapped at link time.
add_executable(test_zero_alloc ${CMAKE_CURRENT_LIST_DIR}/zero_alloc.c)
target_link_libraries(test_zero_alloc PRIVATE nanomegatron_lib)
target_link_options(test_zero_alloc PRIVATE -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=aligned_alloc)
add_test(NAME test_zero_alloc COMMAND test_zero_alloc WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
set_tests_properties(test_zero_alloc PROPERTIES LABELS "cpu;e2e" ENVIRONMENT "${NM_TEST_ENV}")
